"""The local server `ckptflow server start|stop|status` keeps running between CLI runs: its record,
status and stop (starting it is flows/runtime/server.py's `start_server`, as for the temporary one).

Each CLI run without `PREFECT_API_URL` otherwise starts a temporary server (3-4 s of a small
machine's time, every run). `ckptflow server start` runs Prefect's full server (services, UI) in
the background, detached from the terminal, logging to `server.log`, with a PREFECT_HOME of its
own, so its database never mixes with the user's `~/.prefect`, on a loopback port; its URL, PID
and the PID's start time go to `server.json` beside it. Every later CLI run finds it
(`running_url()`, one health check of a few milliseconds) and uses it; the runs stay in its
database, browsable in its UI.
`ckptflow server stop` sends it SIGTERM only once the PID is proven to be that server: its start
time (the kernel's, /proc/PID/stat) must be the one recorded in `server.json`. A PID the kernel
has since given to another process (after a reboot, or a server killed without `stop`) is never
signalled, whatever its command line says; the stale record is removed and the CLI says so.

The folder is `$CKPTFLOW_SERVER_HOME`, else `$XDG_CACHE_HOME/ckptflow/server` (~/.cache/…).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from ckptflow.flows.printable import printable
from ckptflow.flows.runtime.server import ServerError, health, last_line, start_server, wait_until_answers
from ckptflow.flows.runtime.user_dirs import missing_home, unwritable
from ckptflow.flows.runtime.watchdog import proc_stat

START_TIMEOUT_S = 120.0


def home() -> Path:
    base = os.environ.get("CKPTFLOW_SERVER_HOME")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "ckptflow" / "server"


def _state() -> dict | None:
    try:
        state = json.loads((home() / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("url"), str) else None


def running_url() -> str | None:
    """The local server's API URL if it is running and answers, else None (cheap: no Prefect).
    A record whose PID is not the server it recorded is not trusted, even if its port answers."""
    state = _state()
    if state is None or stale_reason(state) is not None:
        return None
    return state["url"] if health(state["url"], timeout=0.5) else None


def process_start(pid: int) -> str | None:
    """When `pid` started, as a token that differs for any later process with the same PID: its
    start time in clock ticks after boot (/proc/PID/stat field 22), or psutil's creation time where
    there is no /proc and psutil is installed. None when the process is gone or it cannot be told."""
    if os.path.isdir("/proc/self"):
        st = proc_stat(pid)
        return f"proc:{st[1]}" if st is not None else None  # /proc is there: None means gone
    try:
        import psutil  # optional: not a dependency of ckptflow
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time()!r}"
    except psutil.Error:
        return None


def stale_reason(state: dict) -> str | None:
    """Why the PID in `server.json` cannot be the server it records; None when it is proven to be."""
    pid, started = state.get("pid"), state.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "it names no process"
    if not isinstance(started, str):
        return (f"it does not record when pid {pid} started (an older ckptflow wrote it), so pid {pid} "
                "cannot be proven to be the server; if that server still runs, stop it yourself")
    now = process_start(pid)
    if now is None:
        return f"pid {pid} is gone"
    if now != started:
        return f"pid {pid} is now another process (it started at another time)"
    return None


def forget_stale() -> str | None:
    """Remove a `server.json` whose PID is not the server it records; what to tell the user, or None."""
    state = _state()
    why = stale_reason(state) if state is not None else None
    if why is None:
        return None
    (home() / "server.json").unlink(missing_ok=True)
    return f"removed the stale {printable(home() / 'server.json')}: {why}; signalled nothing"


def _env() -> dict[str, str]:
    """The server's environment: its own PREFECT_HOME, none of the user's profile or API URL."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home() / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK=os.environ.get("DO_NOT_TRACK", "1"))
    env.pop("PREFECT_PROFILES_PATH", None)
    return env


def _check_home() -> Path:
    """The server's PREFECT_HOME, proven writable before spawning (Prefect would only say
    "Application startup failed")."""
    if not os.environ.get("CKPTFLOW_SERVER_HOME") and not os.environ.get("XDG_CACHE_HOME") and missing_home():
        raise ServerError(f"{missing_home()}, so the local server has no folder for its database; set HOME to "
                          "an existing folder, or CKPTFLOW_SERVER_HOME to where the server should keep its files")
    prefect_home = home() / "prefect"
    why = unwritable(prefect_home)
    if why is not None:
        raise ServerError(f"the local server's folder {printable(prefect_home)} is not writable ({why}); set "
                          "CKPTFLOW_SERVER_HOME to a writable folder")
    return prefect_home


def start(port: int | None = None) -> str:
    """Start the local server (or find it running); its API URL."""
    url = running_url()
    if url:
        return url
    prefect_home = _check_home()
    stop()  # a proven server that stopped answering, or a stale state file
    proc, url = start_server("local", home() / "server.log", port or 0, _env())
    started = process_start(proc.pid)  # now, while the PID is certainly this child's
    if wait_until_answers(url, proc, START_TIMEOUT_S, interval=0.2) is not None:
        proc.kill()
        raise ServerError(f"the local Prefect server did not start on {url} "
                          f"({_last_line(home() / 'server.log')}); its log: {home() / 'server.log'}")
    record = {"url": url, "pid": proc.pid, "started": started, "prefect_home": str(prefect_home)}
    (home() / "server.json").write_text(json.dumps(record) + "\n")
    return url


def _last_line(path: Path) -> str:
    try:
        return last_line(path.read_text(errors="replace")) or "no output"
    except OSError:
        return "no log"


def stop() -> bool:
    """Stop the local server; False when none was running. A PID not proven to be the server it
    recorded is never signalled."""
    state = _state()
    (home() / "server.json").unlink(missing_ok=True)
    if state is None or stale_reason(state) is not None:
        return False
    try:
        os.kill(state["pid"], signal.SIGTERM)
    except OSError:
        return False
    return True


def status() -> tuple[str | None, int | None]:
    """(API URL, PID) of the running local server, or (None, None)."""
    url = running_url()
    return (url, (_state() or {}).get("pid")) if url else (None, None)

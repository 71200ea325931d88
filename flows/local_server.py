"""`ckptflow server start|stop|status`: a Prefect server kept running between CLI runs.

Each CLI run without `PREFECT_API_URL` otherwise starts a temporary server (3-4 s of a small
machine's time, every run). `ckptflow server start` runs Prefect's own server (`prefect server
start`, UI included) in the background, detached from the terminal, logging to `server.log`,
with a PREFECT_HOME of its own, so its database never mixes with the user's `~/.prefect`, on a
loopback port; its URL and PID go to `server.json` beside it. (Prefect's `--background` mode
is not used: it leaves the server writing to pipes nobody reads once the starting CLI exits.)
Every later CLI run finds it (`running_url()`, one health check of a few milliseconds) and uses
it; the runs stay in its database, browsable in its UI.
`ckptflow server stop` sends it SIGTERM (after checking the PID is still that server).

The folder is `$CKPTFLOW_SERVER_HOME`, else `$XDG_CACHE_HOME/ckptflow/server` (~/.cache/…).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ckptflow.flows.server import ServerError, health, last_line, wait_until_answers

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
    """The local server's API URL if it is running and answers, else None (cheap: no Prefect)."""
    state = _state()
    if state is None:
        return None
    return state["url"] if health(state["url"], timeout=0.5) else None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home() / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK=os.environ.get("DO_NOT_TRACK", "1"))
    env.pop("PREFECT_PROFILES_PATH", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_server(pid: int) -> bool:
    """Is `pid` still the process `start` spawned (not a recycled PID)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        return b"prefect" in cmd and b"server" in cmd
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc: alive is the best we can tell
            return True
        except OSError:
            return False


def start(port: int | None = None) -> str:
    """Start the local server (or find it running); its API URL."""
    url = running_url()
    if url:
        return url
    stop()  # a server that stopped answering, or a stale state file
    (home() / "prefect").mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(home() / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    if wait_until_answers(url, proc, START_TIMEOUT_S, interval=0.2) is not None:
        proc.kill()
        raise ServerError(f"the local Prefect server did not start on {url} "
                          f"({_last_line(home() / 'server.log')}); its log: {home() / 'server.log'}")
    (home() / "server.json").write_text(json.dumps({"url": url, "pid": proc.pid}) + "\n")
    return url


def _last_line(path: Path) -> str:
    try:
        return last_line(path.read_text(errors="replace")) or "no output"
    except OSError:
        return "no log"


def stop() -> bool:
    """Stop the local server; False when none was running."""
    state = _state()
    (home() / "server.json").unlink(missing_ok=True)
    pid = state.get("pid") if state else None
    if not isinstance(pid, int) or not _is_server(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True


def status() -> tuple[str | None, int | None]:
    """(API URL, PID) of the running local server, or (None, None)."""
    url = running_url()
    return (url, (_state() or {}).get("pid")) if url else (None, None)

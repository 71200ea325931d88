"""Which Prefect server a CLI run talks to, chosen before Prefect is imported, and ckptflow's own
temporary one.

In order:

1. `PREFECT_API_URL` in the environment: the user's server.
2. The local server `ckptflow server start` left running (flows/runtime/local_server.py), if it answers:
   its URL is exported, and the run costs no server start-up at all.
3. A Prefect profile that names a server (`prefect config set PREFECT_API_URL=…`): that one.
4. Otherwise a temporary server of ckptflow's own, for this process only: the app Prefect's
   ephemeral mode runs (`prefect.server.api.server:create_app` under uvicorn, UI off), same
   database (PREFECT_HOME), but started by `prestart()` the moment the plan is made, before the
   CLI imports torch and Prefect, so its 3-4 s start-up overlaps theirs. Its URL is exported
   before Prefect reads its settings, so this process and every local worker (process pool,
   Dask LocalCluster) talk to it as to any server, and the client never imports Prefect's
   server code (seconds on a small machine). It listens on a socket this process bound (port
   chosen by the kernel, handed over as a file descriptor: no port race), runs in its own session
   (the terminal's Ctrl-C is the CLI's, flows/runtime/interrupt.py), and is stopped without waiting when
   the CLI leaves; the orphan watchdog (flows/runtime/watchdog.py) reaps it if the CLI is SIGKILLed.

`ready()` waits until it answers. A server named elsewhere in Prefect's settings (prefect.toml,
.env) that the quick profile check missed is found there too: the temporary server stops and
the command starts again without one, so the user's configuration always wins.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import IO

from ckptflow.storage.errors import UserError

# Set on a re-executed CLI: a server was configured after all; start no temporary one.
_NO_TEMPORARY = "CKPTFLOW_NO_TEMPORARY_SERVER"

_kind: str | None = None  # "temporary" | "local" | None (the user's server, or not chosen yet)
_proc: subprocess.Popen | None = None
_log: IO[bytes] | None = None
_url: str | None = None


class ServerError(UserError):
    """A Prefect server that does not start or does not answer."""


def kind() -> str | None:
    """"temporary" (this process's own server), "local" (`ckptflow server start`'s) or None."""
    return _kind


def owned() -> bool:
    """Is this run's server one ckptflow started on this machine's loopback (temporary or local)?
    Workers on other machines cannot reach it."""
    return _kind is not None


def health(url: str, timeout: float = 1.0) -> bool:
    """Does the Prefect API at `url` (…/api) answer its health check?"""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def uvicorn_command(fd: int) -> list[str]:
    """Prefect's API app under uvicorn, serving the listening socket `fd`."""
    app_dir = os.path.dirname(importlib.util.find_spec("prefect").submodule_search_locations[0])
    return [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
            "prefect.server.api.server:create_app", "--fd", str(fd), "--log-level", "error",
            "--lifespan", "on"]


def _ephemeral_allowed() -> bool:
    for var in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if os.environ.get(var, "").strip().lower() in ("0", "false", "no", "off"):
            return False
    return True


def _profile_names_server() -> bool:
    """Does the active Prefect profile set PREFECT_API_URL? (profiles.toml, read without Prefect)"""
    import tomllib

    home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    path = os.environ.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml")
    try:
        with open(path, "rb") as f:
            profiles = tomllib.load(f)
    except (OSError, ValueError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    settings = (profiles.get("profiles") or {}).get(active) or {}
    return isinstance(settings, dict) and bool(settings.get("PREFECT_API_URL"))


def prestart() -> None:
    """Choose this CLI run's server (see the module's docstring) and start ours if it needs one.
    Does nothing outside a real CLI process (a test's `main(argv)`, a deployment run)."""
    global _kind, _proc, _log, _url
    from ckptflow.flows.runtime import interrupt, local_server

    if _kind is not None or not interrupt.armed() or os.environ.get("PREFECT_API_URL"):
        return
    url = local_server.running_url()
    if url:
        os.environ["PREFECT_API_URL"], _kind, _url = url, "local", url
        return
    if os.environ.get(_NO_TEMPORARY) or _profile_names_server() or not _ephemeral_allowed():
        return
    check_prefect_home()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    _log = tempfile.TemporaryFile()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    _proc = subprocess.Popen(uvicorn_command(sock.fileno()), pass_fds=[sock.fileno()], env=env,
                             stdin=subprocess.DEVNULL, stdout=_log, stderr=_log, start_new_session=True)
    _url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    sock.close()  # the server holds its own copy
    os.environ["PREFECT_API_URL"], _kind = _url, "temporary"


def check_prefect_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME: a `ServerError` naming it, now,
    if nothing can be written there (Prefect would say "Application startup failed", seconds later)."""
    from pathlib import Path

    from ckptflow.flows.printable import printable
    from ckptflow.flows.runtime.user_dirs import unwritable

    folder = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    why = unwritable(Path(folder))
    if why is not None:
        raise ServerError(f"PREFECT_HOME ({printable(folder)}) is not writable ({why}); Prefect's temporary "
                          "server keeps its database there: set PREFECT_HOME to a writable folder, or export "
                          "PREFECT_API_URL of a running server")


def _configured_elsewhere() -> bool:
    """Do Prefect's settings, without the URL we exported, name a server? (prefect.toml, .env, …)"""
    from prefect.settings import Settings

    ours = os.environ.pop("PREFECT_API_URL", None)
    try:
        return bool(Settings().api.url)
    except Exception:  # noqa: BLE001 - unreadable settings: Prefect reports them itself later
        return False
    finally:
        if ours is not None:
            os.environ["PREFECT_API_URL"] = ours


def ready(timeout: float | None = None) -> None:
    """Wait until the temporary server answers; a `ServerError` with its last words if it died."""
    if _kind != "temporary" or _proc is None:
        return
    if _configured_elsewhere():
        stop()
        os.environ.pop("PREFECT_API_URL", None)
        os.environ[_NO_TEMPORARY] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "ckptflow.flows.cli", *sys.argv[1:]])
    limit = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
    why = wait_until_answers(_url, _proc, limit, interval=0.05)
    said = last_line(_log_text())
    said = f" ({said})" if said else ""
    if why == "exited":
        raise ServerError(f"Prefect's temporary server exited with status {_proc.returncode} before it "
                          f"answered{said}; start one yourself (`prefect server start`) and "
                          "export PREFECT_API_URL, or run `ckptflow server start`")
    if why == "timeout":
        stop()
        raise ServerError(f"Prefect's temporary server did not answer within {limit:.0f} s{said}; "
                          "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `ckptflow server start`")


def wait_until_answers(url: str, proc: subprocess.Popen, limit: float, interval: float) -> str | None:
    """Poll the health of the server `proc` runs at `url` until it answers (None), `proc` exits
    ("exited") or `limit` seconds pass ("timeout")."""
    deadline = time.monotonic() + limit
    while not health(url, timeout=2.0):
        if proc.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(interval)
    return None


def last_line(text: str) -> str:
    """The last non-blank line of a server's log, trimmed for an error message ("" if none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _log_text() -> str:
    if _log is None or _log.closed:
        return ""
    try:
        _log.seek(0)
        return _log.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""


def stop() -> None:
    """Stop the temporary server without waiting (SIGTERM; the watchdog SIGKILLs a straggler)."""
    if _proc is not None and _proc.poll() is None:
        try:
            _proc.terminate()
        except OSError:
            pass


def label() -> tuple[str, str | None]:
    """Which server this run used, for its summary: ("temporary" | "local" | "yours", URL or None)."""
    return (_kind or "yours"), _url

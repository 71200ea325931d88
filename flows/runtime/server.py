"""Starting a Prefect server, both kinds ckptflow starts, and which server a CLI run talks to.

`start_server` is the one way ckptflow starts a Prefect server: Prefect's app
(`prefect.server.api.server:create_app`) under uvicorn, on a loopback socket this process binds
(the port asked for, else one the kernel picks, handed over as a file descriptor: no port race),
in a session of its own (the terminal's Ctrl-C is the CLI's, flows/runtime/interrupt.py);
`wait_until_answers` then polls its health. Two kinds:

- "temporary": one CLI run's own server, the app Prefect's ephemeral mode runs, UI off.
- "local": the persistent server `ckptflow server start` keeps between runs
  (flows/runtime/persistent_server.py: its record, status, stop): Prefect's full server as
  `prefect server start` runs it (services, UI), its UI told the API URL it serves on.

Which server a CLI run uses, in order:

1. `PREFECT_API_URL` in the environment: the user's server.
2. The local server `ckptflow server start` left running, if it answers: its URL is exported,
   and the run costs no server start-up at all.
3. A Prefect profile that names a server (`prefect config set PREFECT_API_URL=…`): that one.
4. Otherwise a temporary server, for this process only: same database (PREFECT_HOME), but
   started by `prestart()` the moment the plan is made, before the CLI imports torch and Prefect,
   so its 3-4 s start-up overlaps theirs. Its URL is exported before Prefect reads its settings,
   so this process and every local worker (process pool, Dask LocalCluster) talk to it as to any
   server, and the client never imports Prefect's server code (seconds on a small machine). It
   is stopped without waiting when the CLI leaves; the orphan watchdog (flows/runtime/watchdog.py)
   reaps it if the CLI is SIGKILLed.

`Server.ready()` waits until it answers. A server named elsewhere in Prefect's settings
(prefect.toml, .env) that the quick profile check missed is found there too: the temporary
server stops and Prefect's settings are read again without it (no re-executed process), so the
user's configuration always wins.

The choice lives in a `Server` handle the CLI's runtime holds (`ckptflow.flows.runtime.process`),
not in module globals; `_export` is the one place `PREFECT_API_URL` is written, for the
temporary server, the local one and the one local worker processes share.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

from ckptflow.storage.errors import UserError


class ServerError(UserError):
    """A Prefect server that does not start or does not answer."""


def _export(url: str | None) -> None:
    """The one place ckptflow sets (or, with None, unsets) `PREFECT_API_URL`: before Prefect reads
    its settings, and inherited by every worker process started after."""
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url


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


ServerKind = Literal["temporary", "local"]


def start_server(kind: ServerKind, log: IO[bytes] | Path, port: int = 0,
                 env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a Prefect server of `kind` (see the module's docstring) on 127.0.0.1:`port` (0: one the
    kernel picks), logging to `log` (a file path is appended to), its environment `env` (default:
    this process's); returns at once with (its process, its API URL): `wait_until_answers` says
    when it answers. A `ServerError`, before anything is spawned or written, if the port cannot
    be had."""
    sock = _listen(port)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(log, "ab")) if isinstance(log, Path) else log
            proc = subprocess.Popen(uvicorn_command(sock.fileno()), pass_fds=[sock.fileno()],
                                    env=_server_env(kind, url, os.environ if env is None else env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    finally:
        sock.close()  # the server holds its own copy
    return proc, url


def _server_env(kind: ServerKind, url: str, env: Mapping[str, str]) -> dict[str, str]:
    env = dict(env)
    env["PREFECT__SERVER_FINAL"] = "1"  # no other instance of the app runs in that process
    if kind == "temporary":
        env.update(PREFECT_UI_ENABLED="0", PREFECT_SERVER_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1")
        return env
    # The local server: services and UI, as `prefect server start` runs the same app.
    env.pop("PREFECT__SERVER_EPHEMERAL", None)
    env.pop("PREFECT__SERVER_WEBSERVER_ONLY", None)
    # The UI asks the server which API to call (/ui-settings). Unset, Prefect builds that URL from
    # PREFECT_SERVER_API_PORT (4200), not the port it serves on: the UI could not reach its API.
    # A URL the user set (a proxy in front of the server) stands.
    if not (env.get("PREFECT_SERVER_UI_API_URL") or env.get("PREFECT_UI_API_URL")):
        env["PREFECT_SERVER_UI_API_URL"] = url
    return env


def _listen(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port`, bound here, before spawning: Prefect's own message
    for a taken port is a wrapped panel whose last line alone says nothing, and comes seconds later."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OverflowError:
        sock.close()
        raise ServerError(f"--port {port} is not a port number; choose one from 1024 to 65535") from None
    except OSError as exc:
        sock.close()
        if not port:
            raise ServerError(f"cannot listen on 127.0.0.1 ({exc.strerror})") from None
        if exc.errno == errno.EADDRINUSE:
            raise ServerError(f"port {port} on 127.0.0.1 is taken by another program; choose another "
                              "--port, or leave --port out to get a free one") from None
        raise ServerError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another --port, "
                          "or leave --port out to get a free one") from None
    return sock


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


class Server:
    """The Prefect server of one run, chosen once (see the module's docstring); it owns ckptflow's
    temporary server process when it started one. Built by the CLI's runtime; a flow run without
    one (a deployment, a script) gets a `Server()` that chose nothing: Prefect's settings decide."""

    def __init__(self) -> None:
        self.kind: str | None = None  # "temporary" | "local" | None (the user's, or not chosen)
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def owned(self) -> bool:
        """Is this run's server one ckptflow started on this machine's loopback (temporary or
        local)? Workers on other machines cannot reach it."""
        return self.kind is not None

    def label(self) -> tuple[str, str | None]:
        """Which server this run used, for its summary: ("temporary" | "local" | "yours", URL or None)."""
        return (self.kind or "yours"), self.url

    def prestart(self, temporary: bool = True) -> None:
        """Choose the server (see the module's docstring) and, if `temporary` allows it and none is
        configured, start ckptflow's own: `temporary` is False outside a CLI process (a test's
        `main(argv)`, a script), which leaves the choice to Prefect."""
        from ckptflow.flows.runtime import persistent_server

        if self.kind is not None or not temporary or os.environ.get("PREFECT_API_URL"):
            return
        url = persistent_server.running_url()
        if url:
            _export(url)
            self.kind, self.url = "local", url
            return
        if _profile_names_server() or not _ephemeral_allowed():
            return
        check_prefect_home()
        self._log = tempfile.TemporaryFile()
        self._proc, self.url = start_server("temporary", self._log)
        _export(self.url)
        self.kind = "temporary"

    def ready(self, timeout: float | None = None) -> None:
        """Wait until the temporary server answers; a `ServerError` with its last words if it died.

        A server named in Prefect's other settings (prefect.toml, .env) wins: the temporary one
        stops and Prefect's settings are read again without our URL (Prefect has been imported by
        now, so its global settings were built with it)."""
        if self.kind != "temporary" or self._proc is None:
            return
        if _configured_elsewhere():
            self.stop()
            _export(None)
            self.kind, self.url = None, None
            from prefect.context import refresh_global_settings_context

            refresh_global_settings_context()
            return
        limit = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
        why = wait_until_answers(self.url or "", self._proc, limit, interval=0.05)
        said = last_line(self._log_text())
        said = f" ({said})" if said else ""
        if why == "exited":
            raise ServerError(f"Prefect's temporary server exited with status {self._proc.returncode} before it "
                              f"answered{said}; start one yourself (`prefect server start`) and "
                              "export PREFECT_API_URL, or run `ckptflow server start`")
        if why == "timeout":
            self.stop()
            raise ServerError(f"Prefect's temporary server did not answer within {limit:.0f} s{said}; "
                              "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `ckptflow server start`")

    def share_with_workers(self) -> str:
        """A server every local worker process (a process pool, a Dask LocalCluster) reaches, its
        URL exported before they start: they inherit it, and record their task runs there instead
        of each starting a server of its own. With none configured or started, that is the
        temporary server Prefect starts for this process on first use (its singleton: the flow
        run is already recorded there)."""
        from prefect.server.api.server import SubprocessASGIServer

        if self.url is None:
            server = SubprocessASGIServer()
            server.start()
            self.url = server.api_url
        _export(self.url)
        return self.url

    def stop(self) -> None:
        """Stop the temporary server without waiting (SIGTERM; the watchdog SIGKILLs a straggler)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.terminate()
            except OSError:
                pass

    def _log_text(self) -> str:
        if self._log is None or self._log.closed:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""


def check_prefect_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME: a `ServerError` naming it, now,
    if nothing can be written there (Prefect would say "Application startup failed", seconds later)."""
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

    ours = os.environ.get("PREFECT_API_URL")
    _export(None)
    try:
        return bool(Settings().api.url)
    except Exception:  # noqa: BLE001 - unreadable settings: Prefect reports them itself later
        return False
    finally:
        _export(ours)


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

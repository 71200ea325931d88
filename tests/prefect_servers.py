"""The tests' Prefect: a database migrated once per session, and one server per test session.

Starting a Prefect server costs seconds (more on a loaded 2-core machine), one on a fresh
PREFECT_HOME first migrates a new database (10-15 s), and a server's events pipeline costs CPU for
every run it records. So:

- `template_db()`: the session's migrated `prefect.db` (block types registered), made once. The
  first process that asks makes it under an exclusive lock; the others wait on that lock. The
  folder is named in `$CKPTFLOW_TEST_PREFECT_TEMPLATE`, set by the process that loads conftest.py
  first (pytest's controller), so every xdist worker inherits the same one.
- `seed_home(home)`: a PREFECT_HOME holding a copy of it, for tests that need a home of their own
  (a CLI run's temporary server, `ckptflow server start`): their server finds the database at the
  current revision and does not migrate it.
- `api_url()`: the session's server, shared by every xdist worker. Under xdist the controller
  starts it in the background (`start_shared()`, from conftest's pytest_configure) and hands its
  URL to the workers in `$CKPTFLOW_TEST_PREFECT_URL`; a worker's first test that needs it waits for
  /health. A run without xdist starts it in its own process when a test first needs it. It dies
  with the process that started it, even one killed by SIGKILL (its stdin is a pipe from there).
  CLI subprocesses reach it through PREFECT_API_URL (helpers.cli_env), in-process flows through
  the `prefect_harness` fixture (`clients_on(url)`).
- `PrivateServer`: a server of a test's own, for what must not touch the shared one (a global tag
  concurrency limit throttles every test's shard tasks while it exists).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMPLATE_ENV = "CKPTFLOW_TEST_PREFECT_TEMPLATE"
URL_ENV = "CKPTFLOW_TEST_PREFECT_URL"  # the shared server's API URL, set by the process that owns it
DIR_ENV = "CKPTFLOW_TEST_PREFECT_DIR"  # its folder: server.log, and `failed` if it could not start
STARTUP_S = 240.0  # a server on a loaded 2-core machine has taken 30 s and more

# Migrate (create_db) and register block types, as a server's first start does; then exit, so
# the file is closed (nothing left in a -wal file) before anyone copies it.
_MAKE_DB = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
        await session.commit()

asyncio.run(main())
"""

# A full server's services (not an ephemeral one's: the tests need the deployments' scheduler), less
# those no test needs. Kept: the scheduler (test_deploy's scheduled deployment), the task-run recorder
# (task runs are recorded from events in Prefect 3), the event and log distributors (`prefect
# deployment run --watch` streams them), the repossessor (expires concurrency-slot leases a killed
# task held). Measured (server CPU for 8 in-process demo conversions + 10 s idle): all services 4.2 s,
# these off 3.3 s (the event persister alone 0.2 s of it); idle, ~0.2 CPU-s a minute less.
SERVICES_OFF = {
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",  # no test reads events back
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",  # no automations
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
}


def _base_env(home: Path) -> dict[str, str]:
    """A Prefect process on `home`, configured by nothing of the developer's (profile, URL, key)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
                        "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    return env


def template_dir() -> Path:
    folder = os.environ.get(TEMPLATE_ENV)
    if not folder:
        os.environ[TEMPLATE_ENV] = folder = tempfile.mkdtemp(prefix="ckptflow-test-prefect-template-")
    return Path(folder)


def template_db() -> Path:
    """The session's migrated database; the first caller of any process makes it, the others wait."""
    folder = template_dir()
    db = folder / "home" / "prefect.db"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the maker's file is whole
        if not (folder / "ready").exists():
            (folder / "home").mkdir(exist_ok=True)
            made = subprocess.run([sys.executable, "-c", _MAKE_DB], env=_base_env(folder / "home"),
                                  capture_output=True, text=True, timeout=600)
            if made.returncode != 0:
                raise RuntimeError(f"could not migrate the tests' Prefect database in {folder}:\n"
                                   f"{made.stderr[-3000:]}")
            (folder / "ready").write_text("")
    return db


def seed_home(home: Path) -> Path:
    """`home` as a PREFECT_HOME holding a copy of the migrated database (an existing one is kept)."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(template_db(), home / "prefect.db")
    return home


# The server's launcher: uvicorn, plus a thread that stops it when its stdin (a pipe from the process
# that started it) closes, so a test session that dies, even by SIGKILL, leaves no server behind.
_LAUNCH = """
import os, runpy, signal, sys, threading
def watch():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[1:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class PrivateServer:
    """A Prefect API server on a seeded home in a temporary folder, on a loopback socket bound now
    (so its URL is known at once); the seeding and the process start run in a thread."""

    def __init__(self, **extra_env: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ckptflow-test-prefect-"))
        self.proc: subprocess.Popen | None = None
        self.log: IO[bytes] | None = None
        self.error: BaseException | None = None
        self.answered = False
        self._extra = extra_env
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)  # a client that comes early waits in the backlog
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/api"
        self._thread = threading.Thread(target=self._spawn, name="prefect-test-server", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        try:
            from ckptflow.flows.runtime.server import uvicorn_command

            home = seed_home(self.folder / "home")
            # The app the CLI's servers run (flows/runtime/server.py), no UI, the services SERVICES_OFF
            # leaves on; the copied database is at head and its block types registered.
            env = {**_base_env(home), "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_UI_ENABLED": "0",
                   "PREFECT__SERVER_FINAL": "1", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
                   **SERVICES_OFF, **self._extra}
            self.log = open(self.folder / "server.log", "wb")
            fd = self._sock.fileno()
            command = uvicorn_command(fd)
            assert command[1:3] == ["-m", "uvicorn"], command
            self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, *command[3:]], pass_fds=[fd], env=env,
                                         stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT)
            (self.folder / "pid").write_text(str(self.proc.pid))
            _raise_priority(self.proc.pid)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the URL
            self.error = exc
            (self.folder / "failed").write_text(f"{type(exc).__name__}: {exc}")
        finally:
            self._sock.close()  # the server holds its own copy

    def ready(self) -> str:
        from ckptflow.flows.runtime.server import wait_until_answers

        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the tests' Prefect server did not start: {self.error}") from self.error
        assert self.proc is not None
        if self.answered:
            return self.url
        why = wait_until_answers(self.url, self.proc, STARTUP_S, interval=0.1)
        self.answered = why is None
        if why is not None:
            raise RuntimeError(f"the tests' Prefect server {why} before it answered at {self.url}:\n"
                               + _log_tail(self.folder))
        return self.url

    def stop(self) -> None:
        self._thread.join()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """The server process's user + system CPU so far (for the session's report)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rest(url: str, body: object = None, method: str | None = None, attempts: int = 6) -> object:
    """One call to a Prefect server's REST API (`url` is the full endpoint: GET, or POST of `body`),
    its JSON answer. A 503 is retried, as Prefect's own client does: the server answers 503 to what
    may pass on a retry (SQLite's "database is locked" when writers of several test processes meet
    on the shared server)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _log_tail(folder: Path) -> str:
    try:
        return (folder / "server.log").read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def _wait_for_shared(url: str, folder: Path) -> None:
    """Wait for the shared server another process (xdist's controller) started."""
    from ckptflow.flows.runtime.server import health

    deadline = time.monotonic() + STARTUP_S
    while not health(url, timeout=2.0):
        if (folder / "failed").exists():
            raise RuntimeError(f"the tests' Prefect server did not start: {(folder / 'failed').read_text()}")
        pid = (folder / "pid").read_text() if (folder / "pid").exists() else ""
        if pid and not Path(f"/proc/{pid}").exists():
            raise RuntimeError(f"the tests' Prefect server exited before it answered at {url}:\n"
                               + _log_tail(folder))
        if time.monotonic() > deadline:
            raise RuntimeError(f"the tests' Prefect server did not answer at {url} within {STARTUP_S:.0f} s:\n"
                               + _log_tail(folder))
        time.sleep(0.1)


def _raise_priority(pid: int) -> None:
    """Run a test server ahead of the tests: three xdist workers keep both cores busy, and every test
    with a flow run waits on the server's answers (one event loop, one SQLite file), so its queueing
    for a core was wait time for all of them. Where raising a priority is not allowed (not root, no
    CAP_SYS_NICE) the server runs as it did."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
    except OSError:
        pass


@contextmanager
def clients_on(url: str) -> Iterator[None]:
    """This process's Prefect (flows, and the log and event workers that send their records) talks
    to the server at `url` inside the block, as Prefect's `prefect_test_harness` points it at a
    server of its own: this context's settings and the global ones (code in a context copied earlier,
    the workers' threads). The workers are drained on entry (what earlier flows sent goes to the
    server it was meant for) and on leaving (sent while that server still answers)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def drain() -> None:  # no event loop runs in this thread: each call waits until its workers are done
        EventsWorker.drain_all()
        APILogWorker.drain_all()

    drain()
    with temporary_settings({PREFECT_API_URL: url}), _temporary_global_settings_context(get_settings_context()):
        try:
            yield
        finally:
            drain()


_server: PrivateServer | None = None  # the shared server, in the process that owns it
_answered = False
_lock = threading.Lock()


def start_shared() -> None:
    """Start the session's shared server in the background (idempotent) and name it in the
    environment, for this process and every process it starts from now on (xdist's workers)."""
    global _server
    with _lock:
        if _server is None and not os.environ.get(URL_ENV):
            _server = PrivateServer()
            os.environ[URL_ENV] = _server.url
            os.environ[DIR_ENV] = str(_server.folder)


def api_url() -> str:
    """The shared server's API URL, once it answers (started now, in this process, if no process
    started it yet)."""
    global _answered
    start_shared()
    if _server is not None:
        return _server.ready()
    url = os.environ[URL_ENV]
    if not _answered:
        _wait_for_shared(url, Path(os.environ[DIR_ENV]))
        _answered = True
    return url


def cpu_seconds() -> float | None:
    """The shared server's CPU seconds so far, in the process that owns it (None elsewhere)."""
    return None if _server is None else _server.cpu_seconds()


def stop() -> None:
    """Stop the shared server if this process owns it."""
    global _server
    with _lock:
        if _server is not None:
            _server.stop()
            _server = None
            os.environ.pop(URL_ENV, None)
            os.environ.pop(DIR_ENV, None)

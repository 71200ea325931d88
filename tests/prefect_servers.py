"""The tests' Prefect: a database migrated once per session, and one server per test process.

Starting a Prefect server costs seconds (more on a loaded 2-core machine), and one on a fresh
PREFECT_HOME first migrates a new database (10-15 s). So:

- `template_db()`: the session's migrated `prefect.db` (block types registered), made once. The
  first process that asks makes it under an exclusive lock; the others (xdist workers) wait on
  that lock. The folder is named in `$CKPTFLOW_TEST_PREFECT_TEMPLATE`, set by the process that
  loads conftest.py first (pytest's controller), so every worker inherits the same one.
- `seed_home(home)`: a PREFECT_HOME holding a copy of it, for tests that need a home of their own
  (a CLI run's temporary server, `prefect server start`): their server finds the database at the
  current revision and does not migrate it.
- `api_url()`: this process's server (the app the CLI's own temporary server and Prefect's test
  harness run, on a seeded home), started once and stopped when the session ends. CLI
  subprocesses reach it through PREFECT_API_URL (helpers.cli_env), in-process flows through
  the `prefect_harness` fixture, so neither starts a server per test.
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
from pathlib import Path
from typing import IO

TEMPLATE_ENV = "CKPTFLOW_TEST_PREFECT_TEMPLATE"
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


# The server's launcher: uvicorn, plus a thread that stops it when its stdin (a pipe from the test
# process) closes, so a test process that dies, even by SIGKILL, leaves no server behind.
_LAUNCH = """
import os, runpy, signal, sys, threading
def watch():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[1:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class _Server:
    """A Prefect API server on a seeded home in a temporary folder, on a socket bound here."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ckptflow-test-prefect-"))
        self.proc: subprocess.Popen | None = None
        self.log: IO[bytes] | None = None
        self.url = ""
        self.error: BaseException | None = None
        self.answered = False
        self._thread = threading.Thread(target=self._spawn, name="prefect-test-server", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        try:
            from ckptflow.flows.runtime.server import uvicorn_command

            home = seed_home(self.folder / "home")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            # The app the CLI's temporary server runs (flows/runtime/server.py), services of an ephemeral
            # server only, no UI; the copied database is at head and its block types registered.
            env = {**_base_env(home), "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_UI_ENABLED": "0",
                   "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                   "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
            self.log = open(self.folder / "server.log", "wb")
            command = uvicorn_command(sock.fileno())
            assert command[1:3] == ["-m", "uvicorn"], command
            self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, *command[3:]], pass_fds=[sock.fileno()],
                                         env=env, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT)
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
            sock.close()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the URL
            self.error = exc

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
            log = (self.folder / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the tests' Prefect server {why} before it answered at {self.url}:\n{log}")
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


_server: _Server | None = None
_lock = threading.Lock()


def start() -> None:
    """Start this process's server in the background (idempotent); `api_url()` waits for it."""
    global _server
    with _lock:
        if _server is None:
            _server = _Server()


def api_url() -> str:
    """This process's server's API URL, once it answers (started now if `start()` was not called)."""
    start()
    assert _server is not None
    return _server.ready()


def stop() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.stop()
            _server = None

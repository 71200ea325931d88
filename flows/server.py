"""Prefect's temporary server, started by the CLI itself: early, and deaf to the terminal's Ctrl-C.

Without `PREFECT_API_URL`, Prefect starts a temporary server process on the flow's first API
call. Two things go wrong with that from a terminal:

- Ctrl-C goes to the whole foreground process group, so the server gets it too and prints its
  own shutdown tracebacks (CancelledError, "Application shutdown failed") over the CLI's one line.
- Its start-up (seconds: imports, database migrations) waits until the CLI has imported
  torch and Prefect, instead of overlapping them.

`prestart()` starts the same server object (Prefect keeps one per process, `SubprocessASGIServer()`)
from a thread that blocks SIGINT: a blocked signal stays blocked across fork and exec, so the
server never sees the terminal's Ctrl-C, and the CLI's handler (flows/interrupt.py) stops it
with everything else. The main thread meanwhile imports the flow; `ready()` waits for the
server before the flow is called (Prefect's client would otherwise find it "running" but not
yet healthy). With a real server (PREFECT_API_URL) or outside the CLI, both do nothing.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

_thread: threading.Thread | None = None
_failure: list[BaseException] = []


def _start() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited by the server process
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread by ready()
        _failure.append(exc)


def prestart() -> None:
    """Start the temporary server in the background (once), if this CLI process will need one."""
    global _thread
    from ckptflow.flows import interrupt

    if _thread is not None or not interrupt.armed():
        return
    _thread = threading.Thread(target=_start, name="ckptflow-prefect-server", daemon=True)
    _thread.start()


def ready(timeout: float | None = None) -> Any:
    """Wait for `prestart`'s server; raise what stopped it from starting, if anything did."""
    if _thread is None:
        return None
    _thread.join(timeout)
    if _failure:
        raise _failure[0]
    return None

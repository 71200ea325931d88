"""Ctrl-C and SIGTERM: stop within a second, say how far the run got, exit 130 / 143.

Left to Python and Prefect, a SIGINT becomes a KeyboardInterrupt that Prefect's engine turns
into state proposals, event flushes and a temporary-server shutdown over a dying connection:
over a minute, an EventsWorker dump and an httpx traceback. A run ckptflow started from its CLI
needs none of that to resume: every committed shard is already durable and journaled (the
design survives SIGKILL at any instant), a shard in flight only ever has a hidden temp name
(`.NAME.partial-*`, swept by the next run) and the local DEST lock is an flock the kernel drops.
So the handler prints one line and leaves with `os._exit`: no atexit hooks, no Prefect
teardown. What it does first: release object-store DEST locks (else a rerun would wait out the
lock's 90 s lease) and stop the temporary server (the orphan watchdog, flows/runtime/watchdog.py, reaps
what else is left).

Only the CLI arms this (`arm()`), never a deployment run or a test calling `main(argv)`.
Prefect swaps in its own SIGTERM handler at each flow run's start; the flows call `rearm()`
first thing so ours stays in place.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from ckptflow.flows.runtime import server
from ckptflow.tasks.run import progress

_armed = False


def message() -> str:
    done, total = progress.counts()
    if total:
        return f"interrupted after {done} of {total} shards; run the same command again to resume"
    if done:
        return f"interrupted after {done} shards; run the same command again to resume"
    return "interrupted before any shard was written; run the same command again to start over"


def _handler(signum: int, frame: Any) -> None:
    # Ignore a second Ctrl-C while we leave (a user pressing it twice must not get a traceback).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    progress.clear_bars()
    _release_locks()
    server.stop()  # the temporary server, if this run started one
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
        pass
    os.write(2, f"\n{message()}\n".encode())
    os._exit(128 + signum)


def _release_locks() -> None:
    """Object-store locks this process holds, deleted in at most ~2 s (a hung endpoint must not
    hold the exit; the lock's lease then expires as it would after a crash)."""
    from ckptflow.storage import lock

    worker = threading.Thread(target=lock.release_held, daemon=True)
    worker.start()
    worker.join(2.0)


def armed() -> bool:
    """Did this process's CLI arm the handlers (a real `ckptflow …` process)?"""
    return _armed


def arm() -> None:
    """Install the handlers for SIGINT and SIGTERM (main thread of the CLI only)."""
    global _armed
    if threading.current_thread() is not threading.main_thread():
        return
    _armed = True
    rearm()


def rearm() -> None:
    """Put our handlers back where Prefect replaced them; does nothing unless the CLI armed them."""
    if not _armed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def leave(code: int) -> int:
    """End a CLI process that ran a flow on ckptflow's temporary server without Prefect's teardown.

    After the summary (or an error line) nothing the user needs is left: shards, journal, index
    and DEST are durable, and the temporary server's database only records the run. Prefect's
    atexit teardown (flushing events to a server about to stop) costs seconds and can print an
    EventsWorker warning after an error. So: stop the server process (without waiting), flush,
    `os._exit`. With a server that outlives the run (the user's, or `ckptflow server start`'s)
    the normal exit runs, so every event and log reaches it; `code` is then just returned.
    """
    if not _armed or server.kind() != "temporary":
        return code
    server.stop()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass
    os._exit(code)

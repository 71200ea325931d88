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

Only the CLI's own process arms this (`Interrupt.arm`), never a deployment run or a test calling
`main(argv)`. Prefect swaps in its own SIGTERM handler at each flow run's start, but only in the
main thread: so an armed CLI runs its flow in a thread of its own (`Interrupt.call`) while the
main thread waits and keeps ckptflow's handlers; no flow has to put them back.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from ckptflow.flows.runtime.server import Server


def message(counts: tuple[int, int]) -> str:
    """What to say on an interrupt, given (shards committed so far, shards planned)."""
    done, total = counts
    if total:
        return f"interrupted after {done} of {total} shards; run the same command again to resume"
    if done:
        return f"interrupted after {done} shards; run the same command again to resume"
    return "interrupted before any shard was written; run the same command again to start over"


def _release_locks() -> None:
    """Object-store locks this process holds, deleted in at most ~2 s (a hung endpoint must not
    hold the exit; the lock's lease then expires as it would after a crash)."""
    from ckptflow.storage import lock

    worker = threading.Thread(target=lock.release_held, daemon=True)
    worker.start()
    worker.join(2.0)


_QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


class Interrupt:
    """A CLI process's Ctrl-C / SIGTERM policy: `server` is stopped on the way out; `counts()`
    and `clear_bars()` come from the runtime (every conversion's progress sink)."""

    def __init__(self, server: Server, counts: Callable[[], tuple[int, int]],
                 clear_bars: Callable[[], None]) -> None:
        self.server = server
        self.counts = counts
        self.clear_bars = clear_bars
        self.armed = False
        self.called = False  # `call` ran something (a flow) in this armed process

    def _handler(self, signum: int, frame: Any) -> None:
        # Ignore a second Ctrl-C while we leave (a user pressing it twice must not get a traceback).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.clear_bars()
        _release_locks()
        self.server.stop()  # the temporary server, if this run started one
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass
        os.write(2, f"\n{message(self.counts())}\n".encode())
        os._exit(128 + signum)

    def arm(self) -> None:
        """Install the handlers for SIGINT and SIGTERM (main thread of the CLI only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.armed = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)
        # `os._exit` skips multiprocessing's finalizers: the resource tracker (a process pool's queues)
        # then unlinks their semaphores itself, as it should, and would warn of each "leak" under the
        # one line. It starts with this process's -W options: its warnings go nowhere.
        if _QUIET_TRACKER not in sys.warnoptions:
            sys.warnoptions.append(_QUIET_TRACKER)

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, in a thread of its own when armed: the main thread only waits,
        so the signal handlers that run there stay ours (Prefect installs its SIGTERM handler
        only from the main thread). Returns what `fn` returns, raises what it raises."""
        if not self.armed:
            return fn(*args, **kwargs)
        self.called = True
        outcome: dict[str, Any] = {}

        def body() -> None:
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
                outcome["error"] = exc

        worker = threading.Thread(target=body, name="ckptflow-flow", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)  # short waits: a signal's handler runs between them
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def leave(self, code: int) -> int:
        """End a CLI process that ran a flow, without the interpreter's slow way out.

        On ckptflow's temporary server: after the summary (or an error line) nothing the user needs
        is left: shards, journal, index and DEST are durable, and the temporary server's database
        only records the run. Prefect's atexit teardown (flushing events to a server about to stop)
        costs seconds and can print an EventsWorker warning after an error. So: stop the server
        process (without waiting), flush, `os._exit`.

        With a server that outlives the run (the user's, or `ckptflow server start`'s) Prefect's
        teardown runs, now, as the interpreter would run it at exit (`_run_exit_handlers`), so
        every event and log reaches that server; what the interpreter does after it, freeing every
        object of torch, Prefect and pydantic one by one, is skipped: ~1 CPU-s, and seconds of wall
        on a busy machine, after the summary was printed.

        A process that ran no flow here (a refusal, a dry run; `main(argv)` in a test) gets `code` back.
        """
        if not self.armed:
            return code
        if self.server.kind == "temporary":
            self.server.stop()
        elif not (self.called and _run_exit_handlers()):
            return code
        _flush()
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass


def _run_exit_handlers() -> bool:
    """Run now what the interpreter runs at exit before it frees its objects, in its order: the
    `threading._register_atexit` callbacks (Prefect's log and event workers drain there) and the
    joins of non-daemon threads (`threading._shutdown`), then every `atexit` handler (logging's
    shutdown, weakref finalizers, Prefect's). False, having run nothing, where that cannot be
    done from here (not CPython's `threading`, not the main thread): the normal exit then does it."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        return False
    shutdown()
    atexit._run_exitfuncs()
    return True

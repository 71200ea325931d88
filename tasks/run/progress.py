"""Progress of one conversion: a `ProgressSink` per conversion, never one per process.

Two conversions at once (a `watch` run converts `max_concurrent` checkpoints in threads of one
process) each count their own shards and bytes. The engine hears every shard committed or reused
and counts it on the conversion's sink (`run_shards(progress=…)`); bytes are counted as the
shard function writes them, and that function runs wherever the submitter puts it, so it finds
its conversion's sink through a context variable (`reporting_to`) that the engine sets and that
task threads inherit (Prefect's thread task runner and `ThreadSubmitter` run each call in a copy
of the submitting context). Shards run by other processes (a process pool, Dask) report no bytes
here: their process has no sink; the engine still counts them as their futures resolve.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any


class ProgressSink:
    """Shards committed (written now or reused) of planned, and optionally the terminal's bars
    (`bytes_bar`, `shards_bar`: tqdm-like, `update` / `reset` / `clear` / `close`)."""

    def __init__(self, bytes_bar: Any = None, shards_bar: Any = None) -> None:
        self._lock = threading.Lock()
        self._bars = {k: b for k, b in (("bytes", bytes_bar), ("shards", shards_bar)) if b is not None}
        self.done = 0
        self.total = 0
        self.bytes = 0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            if "bytes" in self._bars:
                self._bars["bytes"].update(n)

    def shard_done(self, n: int = 1) -> None:
        """`n` more shards committed (or found committed): the counter and the shard bar."""
        with self._lock:
            self.done += n
            if "shards" in self._bars:
                self._bars["shards"].update(n)

    def set_totals(self, total_bytes: int, shards: int) -> None:
        """Called once the plan is known (again, when a flow planned afresh), so bars show a share."""
        with self._lock:
            self.done, self.total, self.bytes = 0, shards, 0
            if "bytes" in self._bars:
                self._bars["bytes"].reset(total=total_bytes)
            if "shards" in self._bars:
                self._bars["shards"].reset(total=shards)

    def counts(self) -> tuple[int, int]:
        """(shards committed so far, shards planned)."""
        return self.done, self.total

    def close(self) -> None:
        """Take the bars off the terminal for good."""
        with self._lock:
            for bar in self._bars.values():
                # Cleared first: tqdm closes a leave=False bar below the first by blanking its line and
                # moving up, which leaves the cursor at the blank's end, so the summary printed next
                # started at the terminal's last column and wrapped. A cleared bar closes at column 0.
                bar.clear()
                bar.close()
            self._bars.clear()

    def clear_bars(self) -> None:
        """Take the bars off the terminal from a signal handler: never waits for the lock (the
        interrupted thread may hold it), so at worst a bar line stays."""
        if not self._lock.acquire(timeout=0.2):
            return
        try:
            for bar in self._bars.values():
                try:
                    bar.clear()
                except Exception:  # noqa: BLE001 - cosmetic
                    pass
        finally:
            self._lock.release()


# The sink of the conversion whose shard work runs in this context (None: nobody is counting).
_current: ContextVar[ProgressSink | None] = ContextVar("ckptflow_progress", default=None)


@contextlib.contextmanager
def reporting_to(sink: ProgressSink | None) -> Iterator[None]:
    """Shard work started in this context (and in task threads that copy it) counts on `sink`."""
    token = _current.set(sink)
    try:
        yield
    finally:
        _current.reset(token)


def add_bytes(n: int) -> None:
    """Bytes written by the shard function or a fetch, counted on its conversion's sink, if any."""
    sink = _current.get()
    if sink is not None:
        sink.add_bytes(n)


def shard_done(n: int = 1) -> None:
    """A fetched file done, counted on its conversion's sink, if any."""
    sink = _current.get()
    if sink is not None:
        sink.shard_done(n)

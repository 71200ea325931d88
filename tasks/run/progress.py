"""Progress reporting: shard tasks call these; the CLI attaches tqdm bars when it runs a flow.

Tasks on remote Dask workers report nothing here (their process has no bars); the flow still
counts shards as their futures resolve.
"""
from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_bars: dict[str, Any] = {}
# Shards of this conversion known committed (written now or reused) and planned, every pass
# together: what "interrupted after K of N shards" says. Counted by the flow, not the tasks, so
# shards run by other processes (a process pool, Dask) count too.
_counts = {"done": 0, "total": 0}


def attach(bytes_bar: Any = None, shards_bar: Any = None) -> None:
    with _lock:
        _bars.clear()
        if bytes_bar is not None:
            _bars["bytes"] = bytes_bar
        if shards_bar is not None:
            _bars["shards"] = shards_bar


def detach() -> None:
    with _lock:
        for bar in _bars.values():
            # Cleared first: tqdm closes a leave=False bar below the first by blanking its line and
            # moving up, which leaves the cursor at the blank's end, so the summary printed next
            # started at the terminal's last column and wrapped. A cleared bar closes at column 0.
            bar.clear()
            bar.close()
        _bars.clear()


def add_bytes(n: int) -> None:
    bar = _bars.get("bytes")
    if bar is not None:
        with _lock:
            bar.update(n)


def shard_done(n: int = 1) -> None:
    """One more shard committed (or found committed): the counter and the shard bar."""
    _counts["done"] += n
    bar = _bars.get("shards")
    if bar is not None:
        with _lock:
            bar.update(n)


def set_totals(total_bytes: int, shards: int) -> None:
    """Called by a flow once it knows the plan, so bars show a percentage."""
    _counts.update(done=0, total=shards)
    with _lock:
        if "bytes" in _bars:
            _bars["bytes"].reset(total=total_bytes)
        if "shards" in _bars:
            _bars["shards"].reset(total=shards)


def counts() -> tuple[int, int]:
    """(shards committed so far, shards planned) of the current conversion."""
    return _counts["done"], _counts["total"]


def clear_bars() -> None:
    """Take the bars off the terminal from a signal handler: never waits for the lock (the
    interrupted thread may hold it), so at worst a bar line stays."""
    if not _lock.acquire(timeout=0.2):
        return
    try:
        for bar in _bars.values():
            try:
                bar.clear()
            except Exception:  # noqa: BLE001 - cosmetic
                pass
    finally:
        _lock.release()

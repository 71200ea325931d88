"""Progress reporting: shard tasks call these; the CLI attaches tqdm bars when it runs a flow.

Tasks on remote Dask workers report nothing here (their process has no bars); the flow still
counts shards as their futures resolve.
"""
from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_bars: dict[str, Any] = {}


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
            bar.close()
        _bars.clear()


def add_bytes(n: int) -> None:
    bar = _bars.get("bytes")
    if bar is not None:
        with _lock:
            bar.update(n)


def shard_done(n: int = 1) -> None:
    bar = _bars.get("shards")
    if bar is not None:
        with _lock:
            bar.update(n)


def set_totals(total_bytes: int, shards: int) -> None:
    """Called by a flow once it knows the plan, so bars show a percentage."""
    with _lock:
        if "bytes" in _bars:
            _bars["bytes"].reset(total=total_bytes)
        if "shards" in _bars:
            _bars["shards"].reset(total=shards)

"""Test-only fault timing for one Dask worker: `dask worker --preload tests/dask_preload.py`.

Patches storage functions in the worker process it is loaded into (module attributes and a
class method, which the shard task reaches however its own code was shipped to the worker), so
only that worker is slowed or stopped, at instants a test can see in the bucket:

    CKPTFLOW_TEST_SHARD_DELAY=S        each output shard waits S seconds before it is published
                                       (a run lasts long enough to be killed mid-way; a test
                                       sets the module's `_DELAY` to 0 through `client.run`
                                       once nothing is to be killed)
    CKPTFLOW_TEST_HOLD_AFTER_COMMIT=1  the first shard task whose final journal entry lands in
                                       this worker never returns: its shard is committed and
                                       journaled, and the worker can be killed before Dask
                                       hears of the result
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import ckptflow.storage.files as files
from ckptflow.storage.writer import AtomicFile

_DELAY = float(os.environ.get("CKPTFLOW_TEST_SHARD_DELAY") or 0)
_HOLD = os.environ.get("CKPTFLOW_TEST_HOLD_AFTER_COMMIT") == "1"
_held = threading.Event()
# Dask imports a preload twice (import, then reload from the file): wrap the originals only once.
_real_commit = getattr(AtomicFile.commit, "real", AtomicFile.commit)
_real_write = getattr(files.write_bytes_atomic, "real", files.write_bytes_atomic)


def commit(self: AtomicFile, *args: Any, **kwargs: Any) -> None:
    if _DELAY and self.name.endswith(".safetensors"):
        time.sleep(_DELAY)
    _real_commit(self, *args, **kwargs)


def write_bytes_atomic(loc: Any, name: str, data: bytes) -> None:
    _real_write(loc, name, data)
    if _HOLD and loc.root.rstrip("/").endswith("/journal") and not _held.is_set():
        try:
            final = json.loads(data).get("identity") is not None  # not the entry written before a rename
        except (ValueError, AttributeError):
            final = False
        if final:
            _held.set()
            time.sleep(3600)  # the test SIGKILLs this worker long before


commit.real = _real_commit  # type: ignore[attr-defined]
write_bytes_atomic.real = _real_write  # type: ignore[attr-defined]
AtomicFile.commit = commit  # type: ignore[method-assign]
files.write_bytes_atomic = write_bytes_atomic

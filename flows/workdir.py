"""The work location: fetched sources and persisted shard records (Prefect results) live here."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ckptflow.storage.remote import check_writable_dest
from ckptflow.storage.urls import effective_options, open_location


def default_work(dest: str) -> str:
    """One work directory per destination, so reruns of the same command find their records."""
    base = os.environ.get("CKPTFLOW_WORK") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckptflow", "work")
    return os.path.join(base, hashlib.sha256(dest.rstrip("/").encode()).hexdigest()[:16])


def result_storage(work: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A Prefect result storage every worker of this run can reach.

    A local work dir is a `Path`; a bucket needs a saved `RemoteFileSystem` block (Prefect reads a
    plain "s3://…" string as a block slug, and refuses unsaved block instances).
    """
    loc = open_location(work, storage_options)
    if loc.is_local:
        path = Path(loc.path("results"))
        path.mkdir(parents=True, exist_ok=True)
        return path
    from prefect.filesystems import RemoteFileSystem

    # Prefect's RemoteFileSystem calls `makedirs` before each write, and s3fs's makedirs creates a
    # missing bucket: the work bucket must be there (and writable) before Prefect writes a record.
    check_writable_dest(loc)
    # The options open_location really uses, so Prefect's own writes get the same bounded timeouts.
    block = RemoteFileSystem(basepath=loc.url_of("results"), settings=effective_options(work, storage_options))
    block.save("ckptflow-" + hashlib.sha256(work.encode()).hexdigest()[:12], overwrite=True)
    return block

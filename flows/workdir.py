"""The work location: fetched sources and persisted shard records (Prefect results) live here."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ckptflow.storage.remote import check_writable_dest
from ckptflow.storage.urls import Location, StorageError, effective_options, open_location, protocol_of

from ckptflow.flows.runtime.user_dirs import cache_dir

WORK_FOLDER = ".ckptflow-work"


def default_work(dest: str) -> str:
    """One work location per destination, so reruns of the same command find their records.

    A DEST on a remote store (any URL with a protocol but `file://`) gets its work location on that
    same store, `<DEST's parent>/.ckptflow-work/<DEST's name>` (the rule `watch` uses): every
    machine that can write DEST reaches it, so a rerun from another machine, or a Dask worker on
    one, finds the journal. A local DEST keeps it in this machine's cache.
    """
    protocol = protocol_of(dest)
    if protocol not in (None, "file", "local"):
        head, _, name = dest.rstrip("/").rpartition("/")
        if name and "://" in head:
            return f"{head}/{WORK_FOLDER}/{name}"
    base = os.environ.get("CKPTFLOW_WORK") or os.path.join(cache_dir(), "ckptflow", "work")  # no HOME: in /tmp
    return os.path.join(base, hashlib.sha256(dest.rstrip("/").encode()).hexdigest()[:16])


def check_work_reachable(work: Location, dask_address: str | None) -> None:
    """Shard tasks on another cluster write their journal and records to the work location: a
    path on this machine's disk is not theirs, so resume would silently never find a shard."""
    if dask_address and work.is_local:
        raise StorageError(
            f"--work {work.url} is on this machine's disk, but --dask-address {dask_address} runs shard "
            "tasks on other machines, which cannot reach it (resume would never find their shards); pass "
            "--work on storage every worker reaches, e.g. --work s3://BUCKET/ckptflow-work/NAME")


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

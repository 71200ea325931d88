"""One output shard, start to finish, as a plain function: journal check, write, journal entries.

The Prefect task (`shard_task.write_shard_task`) is a thin wrapper; the engine's serial and thread
submitters call this directly, with no Prefect imported.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

from ckptflow.storage.checkpoint import refuse_changed
from ckptflow.storage.files import write_json
from ckptflow.storage.listing import file_identity
from ckptflow.storage.urls import open_location

from ckptflow.tasks.plan.model import ShardPlan
from ckptflow.tasks.run import progress
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.run.journal import reusable
from ckptflow.tasks.run.resume import shard_key


def run_logger() -> Any:
    """Prefect's run logger inside a Prefect task or flow run (its records reach the API), else
    the `ckptflow.shard` logger: this module never imports Prefect itself."""
    if "prefect" in sys.modules:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            from prefect import get_run_logger

            return get_run_logger()
    return logging.getLogger("ckptflow.shard")


def run_shard(stage: str, shard: ShardPlan, source: str, dest: str,
              fingerprints: list[tuple[str, int, str | None]],
              storage_options: dict[str, Any] | None = None, digest: bool = False,
              device: str = "cpu", backend: str = "auto", journal: str | None = None) -> dict[str, Any]:
    """Write one output shard; returns {url, name, size, sha256, tensors, seconds, …}, with
    `reused: True` when the journal proves an earlier attempt committed it.

    `fingerprints` (the source files as planned) names the journal entry, so a changed source file
    makes a later run recompute this shard; and it is checked again once every byte is read and
    before the shard is published, so a file changed during this run fails the shard instead of
    publishing one that mixes its old and new bytes. `device`/`backend` are not in the key: every
    backend writes the same bytes.

    `journal` (a URL in the work location) gets `<key>.json` twice: once the file is durable and
    just before its final name appears (with the identity a rename keeps), and again after (with
    the full identity): a run killed at any instant after the rename still finds the shard done.
    """
    src = open_location(source, storage_options)
    dst = open_location(dest, storage_options)
    log = run_logger()
    t0 = time.perf_counter()
    extra = {"stage": stage, "source_bytes": shard.source_bytes,
             "worker": f"{socket.gethostname()}:{os.getpid()}"}  # which process ran it (scale-out)
    entry = f"{shard_key(stage, shard, fingerprints, dest)}.json"
    journal_loc = open_location(journal, storage_options) if journal else None
    if journal_loc is not None:
        # The engine checked before submitting, but this may be a retry or a resubmission (Dask
        # resubmits the tasks of a worker it lost, including ones that had committed): what the
        # journal proves is done is never computed again.
        done = reusable(journal_loc, entry, file_identity(dst, shard.file), {entry})
        if done is not None:
            log.info("shard reused stage=%s file=%s (committed by an earlier attempt, worker=%s)",
                     stage, shard.file, done.get("worker"))
            return {**done, "reused": True}

    def before_publish(written: Any, identity: str | None) -> None:
        refuse_changed(src, fingerprints)  # raising here removes the temp file: nothing published
        if journal_loc is not None and identity is not None:
            write_json(journal_loc, entry, {**written.as_dict(), **extra, "seconds": 0.0,
                                            "identity": None, "identity_before_rename": identity})

    record = write_shard(shard, src, dst, progress.add_bytes, digest=digest, device=device, backend=backend,
                         before_publish=before_publish)
    out = {**record.as_dict(), **extra, "seconds": round(time.perf_counter() - t0, 3)}
    if journal_loc is not None:
        write_json(journal_loc, entry, out)
    seconds = max(out["seconds"], 1e-9)
    # One key=value line per shard: greppable in the worker's output and the run's logs in the UI.
    log.info("shard committed stage=%s file=%s tensors=%d bytes_in=%d bytes_out=%d seconds=%.3f gbps_in=%.3f "
             "worker=%s", stage, shard.file, out["tensors"], shard.source_bytes, out["size"], out["seconds"],
             shard.source_bytes / seconds / 1e9, out["worker"])
    return out

"""One planned pass over the bytes, without any orchestrator: prepare DEST, run shards with
journal reuse, finalize, read back and verify.

Which stages run, and in what order, is the recipe's business (`ckptflow.flows.recipe`); how
shard work runs is the `Submitter`'s (`ckptflow.tasks.run.submit`). No Prefect here.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from ckptflow.storage.errors import problem_list
from ckptflow.storage.checkpoint import Checkpoint, scan_checkpoint
from ckptflow.storage.files import (CONFIG_NAME, INDEX_NAME, WEIGHT_SUFFIXES, copy_file, index_document, list_files,
                                    write_json)
from ckptflow.storage.listing import file_identities
from ckptflow.storage.overlap import refuse_under
from ckptflow.storage.urls import Location, StorageError, open_location
from ckptflow.tasks.planners.dequant import refuse_packed_leftovers
from ckptflow.tasks.planners.torch_dtype import DtypeReport, check_dtypes
from ckptflow.tasks.plan.model import PlanError, StagePlan
from ckptflow.tasks.run.progress import ProgressSink
from ckptflow.tasks.run.journal import reusable
from ckptflow.tasks.run.resume import shard_key
from ckptflow.tasks.run.shard import run_logger
from ckptflow.tasks.run.submit import ShardCall, Submitter
from ckptflow.tasks.validate import find_problems


def prepare_dest(dst: Location, planned: set[str], prune: bool = False,
                 protected: tuple[Location, ...] = ()) -> None:
    """Make DEST ready for a run that writes the weight files `planned`; call it holding
    `dest_lock(dst)`, after `refuse_overlap` has checked DEST against SOURCE and the work location.

    Weight files already in DEST that this run will not write (an earlier conversion with
    another layout) would make the result fail validation: with `prune` they are deleted (the
    watch flow owns its output folders), otherwise the run stops here, before writing anything.
    Nothing under a `protected` location (SOURCE) is ever deleted, whatever the paths say.
    """
    present = list_files(dst) if dst.fs.exists(dst.root) else {}
    foreign = sorted(n for n in present if n.endswith(WEIGHT_SUFFIXES) and n not in planned)
    if foreign and not prune:
        raise StorageError(
            f"DEST {dst.url} holds {len(foreign)} weight file(s) this conversion does not write "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}), left by an earlier conversion "
            "with another layout? Delete them, or choose an empty DEST")
    for name in foreign:
        for loc in protected:
            refuse_under(dst.path(name), dst, loc)
    for name in foreign:
        dst.fs.rm(dst.path(name))
    # An index left by an earlier run would vouch for shards this run has not written yet.
    if dst.fs.exists(dst.path(INDEX_NAME)):
        dst.fs.rm(dst.path(INDEX_NAME))
    # Temp files of a killed run (object stores: incomplete multipart uploads, which a bucket
    # lifecycle rule expires) are never mistaken for output, but need not pile up either. The
    # caller holds DEST's lock, so no live run is writing them.
    if dst.is_local and dst.fs.exists(dst.root):
        for path in dst.fs.glob(dst.path(".*.partial-*")):
            dst.fs.rm(path)


def run_shards(plan: StagePlan, ckpt: Checkpoint, src: Location, dst: Location, work: str,
               storage_options: dict[str, Any] | None, submitter: Submitter, digest: bool = False,
               device: str = "cpu", backend: str = "auto",
               on_commit: Callable[[dict[str, Any]], None] | None = None,
               progress: ProgressSink | None = None) -> list[dict[str, Any]]:
    """Reuse each output shard its journal proves, submit the others to `submitter`, and wait;
    returns records in plan order with a `cached` flag (True for the reused).

    `on_commit(record)` is called for every shard as it commits (or is found committed), in
    completion order, in this thread; `progress` (this conversion's sink) counts it too. A shard
    that failed is raised after every other one ended, the first in plan order.
    """
    journal = open_location(f"{work.rstrip('/')}/journal", storage_options)
    futures: list[Any] = []
    reused_files: list[tuple[str, dict[str, Any]]] = []
    identities = file_identities(dst, [shard.file for shard in plan.shards])
    journaled = set(list_files(journal)) if journal.fs.exists(journal.root) else set()
    for shard in plan.shards:
        fps = [ckpt.fingerprint(f) for f in shard.source_files]
        entry = f"{shard_key(plan.stage, shard, fps, dst.url)}.json"
        record = reusable(journal, entry, identities[shard.file], journaled)
        if record is not None:
            futures.append(record)  # the very file this plan committed, untouched since
            reused_files.append((shard.file, record))
            continue
        # Anything else is written again: no file, a file changed since its commit (same size or
        # not), or a commit whose record was lost.
        futures.append(submitter.submit(ShardCall(plan.stage, shard, src.url, dst.url, fps, storage_options,
                                                  digest, device, backend, journal.url)))
    on_commit = on_commit or (lambda record: None)
    sink = progress or ProgressSink()  # nobody listening: counted on a sink no one reads
    reused = [f for f in futures if isinstance(f, dict)]
    for record in reused:  # reused shards count at once: a resumed run's bar starts where it is
        sink.add_bytes(record.get("size", 0))
        sink.shard_done()
        on_commit(record)
    note_reused = getattr(submitter, "note_reused", None)  # e.g. a Prefect submitter: a task run per file
    if reused_files and note_reused is not None:
        note_reused(plan.stage, reused_files)
    if reused:
        run_logger().info("reused %d committed shard(s) of %s: %s", len(reused), plan.stage,
                          ", ".join(r.get("name", "?") for r in reused[:20]) + (" …" if len(reused) > 20 else ""))
    for fut in submitter.as_completed([f for f in futures if not isinstance(f, dict)]):
        try:
            record = fut.result()  # not a Prefect future's state: the API may not have recorded it yet
        except Exception:  # noqa: BLE001 - raised again below, in plan order, after every task ends
            continue
        sink.shard_done()
        on_commit(record)
    records = []
    for fut in futures:
        record = fut if isinstance(fut, dict) else dict(fut.result())
        # Reused: proven before submission, or by the task itself (a resubmitted task whose shard
        # an earlier attempt, e.g. on a lost Dask worker, had committed).
        record["cached"] = isinstance(fut, dict) or bool(record.pop("reused", False))
        records.append(record)
    return records


def drop_intermediate(loc: Location) -> str:
    """Delete a finished run's intermediate pass output (for DeepSeek-V3 `--dequant --mp 8`, a
    1.3 TB BF16 copy under the work location) and say so. Only once DEST has been written and
    verified; a rerun of the same command then computes that pass again."""
    size = sum(list_files(loc).values()) if loc.fs.exists(loc.root) else 0
    if size:
        loc.fs.rm(loc.root, recursive=True)
    return f"deleted the intermediate copy ({size / 1e9:.2f} GB) at {loc.url}"


def finalize(plan: StagePlan, ckpt: Checkpoint, src: Location, dst: Location) -> None:
    """Non-weight files, config.json, then the index — last, once every shard has committed."""
    for name in ckpt.other_files():
        if name == CONFIG_NAME and plan.config is not None:
            continue
        if plan.copy_files is not None and not any(fnmatch.fnmatch(name, g) for g in plan.copy_files):
            continue
        copy_file(src, dst, name)
    if plan.config is not None:
        refuse_packed_leftovers(plan, plan.config, dst.url)  # last line of defence: planners check too
        write_json(dst, CONFIG_NAME, plan.config)
    if plan.write_index and (ckpt.index is not None or len(plan.shards) > 1):
        extra = {k: v for k, v in ((ckpt.index or {}).get("metadata") or {}).items() if k != "total_size"}
        write_json(dst, INDEX_NAME, index_document(plan.weight_map(), plan.total_size, extra))


def verify_output(dst: Location, plan: StagePlan, allow_dtypes: tuple[str, ...] = (),
                  on_report: Callable[[DtypeReport, str], None] | None = None) -> tuple[Checkpoint, DtypeReport]:
    """Read back what was written: index ↔ headers, total_size, dtypes against config.json.
    `on_report(report, url)` hears the dtype report first (a flow publishes it as an artifact)."""
    written = scan_checkpoint(dst)
    problems = [p for p in find_problems(written, require_index=plan.write_index) if p.severity == "error"]
    if problems:
        raise StorageError(f"{dst.url}: the written checkpoint fails validation:\n"
                           + problem_list(problems))
    report = check_dtypes(written, allow_dtypes)
    if on_report is not None:
        on_report(report, dst.url)
    if not report.ok:
        raise PlanError(f"{dst.url}: dtypes do not match config.json:\n{report.text()}")
    return written, report

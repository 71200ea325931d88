"""The convert flow: validate → (fetch) → dequant → finalize → verify, one task per shard.

Shard tasks are cached with `ShardCachePolicy` and their small JSON records persisted in the
work location, so a rerun of the same command after a crash skips every committed shard.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from storage.checkpoint import Checkpoint, scan_checkpoint
from storage.files import CONFIG_NAME, INDEX_NAME, copy_file, index_document, list_files, write_json
from storage.urls import Location, StorageError, open_location
from tasks import progress
from tasks.dequant import resolve_device
from tasks.dequant_plan import plan_dequant
from tasks.fetch import fetch_file, plan_fetch, read_markers, source_listing
from tasks.dtypes import DtypeReport, check_dtypes, check_plan, fix_dtypes, identity_plan
from tasks.plan import PlanError, StagePlan
from tasks.shard_task import write_shard_task
from tasks.validate import check, find_problems

from .report import publish_dtype_report, publish_summary
from .workdir import default_work, result_storage


def _fetch(src: Location, work: str, storage_options: dict[str, Any] | None) -> Location:
    """Copy the source into `<work>/source`, skipping files fetched and verified before."""
    dst = open_location(f"{work.rstrip('/')}/source", storage_options)
    names = list(list_files(src))
    listing = source_listing(src, names)
    local = list_files(dst) if dst.fs.exists(dst.root) else {}
    todo = plan_fetch(listing, read_markers(dst, names, local), local)
    futures = [fetch_file.submit(src.url, dst.url, n, listing[n], storage_options) for n in todo]
    wait(futures)
    for f in futures:
        f.result()
    get_run_logger().info("fetched %d file(s), %d already present", len(todo), len(names) - len(todo))
    return dst


def _output_is_whole(dst: Location, name: str, size: int) -> bool:
    try:
        return int(dst.fs.info(dst.path(name))["size"]) == size
    except FileNotFoundError:
        return False


def run_shards(plan: StagePlan, ckpt: Checkpoint, src: Location, dst: Location, work: str,
               storage_options: dict[str, Any] | None, digest: bool = False, device: str = "cpu",
               backend: str = "auto") -> list[dict[str, Any]]:
    """Submit one cached task per output shard and wait; returns records with a `cached` flag."""
    from storage.safetensors_format import file_size_for

    storage = result_storage(work, storage_options)
    futures = []
    for shard in plan.shards:
        whole = _output_is_whole(dst, shard.file, file_size_for(shard.specs, {"format": "pt"}))
        # A record whose output has vanished (or was cut short) must not count as done.
        task = write_shard_task.with_options(name=f"{plan.stage}-shard", result_storage=storage,
                                             refresh_cache=not whole)
        fps = [ckpt.fingerprint(f) for f in shard.source_files]
        futures.append(task.submit(plan.stage, shard, src.url, dst.url, fps, storage_options, digest,
                                   device, backend))
    wait(futures)
    records = []
    for shard, fut in zip(plan.shards, futures):
        record = dict(fut.result())
        record["cached"] = fut.state.name == "Cached"
        if record["cached"]:
            progress.add_bytes(record.get("size", 0))
            progress.shard_done()
        records.append(record)
    return records


def finalize(plan: StagePlan, ckpt: Checkpoint, src: Location, dst: Location) -> None:
    """Non-weight files, config.json, then the index — last, once every shard has committed."""
    for name in ckpt.other_files():
        if name == CONFIG_NAME and plan.config is not None:
            continue
        copy_file(src, dst, name)
    if plan.config is not None:
        write_json(dst, CONFIG_NAME, plan.config)
    if ckpt.index is not None or len(plan.shards) > 1:
        extra = {k: v for k, v in ((ckpt.index or {}).get("metadata") or {}).items() if k != "total_size"}
        write_json(dst, INDEX_NAME, index_document(plan.weight_map(), plan.total_size, extra))


def _prepare_dest(src: Location, dst: Location) -> None:
    if src.fs.protocol == dst.fs.protocol and src.root.rstrip("/") == dst.root.rstrip("/"):
        raise StorageError(f"DEST {dst.url} is the SOURCE; write the converted checkpoint elsewhere")
    # An index left by an earlier run would vouch for shards this run has not written yet.
    if dst.fs.exists(dst.path(INDEX_NAME)):
        dst.fs.rm(dst.path(INDEX_NAME))
    # Temp files of a killed run (object stores: incomplete multipart uploads, which a bucket
    # lifecycle rule expires) are never mistaken for output, but need not pile up either.
    if dst.is_local and dst.fs.exists(dst.root):
        for path in dst.fs.glob(dst.path(".*.partial-*")):
            dst.fs.rm(path)


def build_plan(ckpt: Checkpoint, dequant: bool, fix: bool, allow_missing_scale: bool,
               allow_dtypes: tuple[str, ...]) -> StagePlan:
    """Compose the requested stages into one plan (one pass over the bytes)."""
    if dequant:
        plan = plan_dequant(ckpt, allow_missing_scale=allow_missing_scale)
    elif fix:
        plan = identity_plan(ckpt)
    else:
        raise PlanError("nothing to do: choose a stage (--dequant, --fix-dtypes)")
    config = plan.config if plan.config is not None else ckpt.config
    if fix:
        plan = fix_dtypes(plan, config, allow_dtypes)
        plan = replace(plan, stage=f"{plan.stage}+fix-dtypes")
    predicted = check_plan(plan, config, allow_dtypes)
    if not predicted.ok:
        raise PlanError(f"{len(predicted.mismatches)} tensor(s) would not match config.json's torch_dtype "
                        f"({predicted.expected}); add --fix-dtypes to cast them, or --allow-dtype REGEX for "
                        "tensors that are meant to differ:\n" + "\n".join(f"  - {m}" for m in predicted.mismatches[:50]))
    return plan


def verify_output(dst: Location, allow_dtypes: tuple[str, ...] = ()) -> tuple[Checkpoint, DtypeReport]:
    """Read back what was written: index ↔ headers, total_size, dtypes against config.json."""
    written = scan_checkpoint(dst)
    problems = [p for p in find_problems(written) if p.severity == "error"]
    if problems:
        raise StorageError(f"{dst.url}: the written checkpoint fails validation:\n"
                           + "\n".join(f"  - {p}" for p in problems))
    report = check_dtypes(written, allow_dtypes)
    publish_dtype_report(report, dst.url)
    if not report.ok:
        raise PlanError(f"{dst.url}: dtypes do not match config.json:\n{report.text()}")
    return written, report


@flow(name="ckptflow-convert", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def convert_flow(source: str, dest: str, dequant: bool = True, work: str | None = None,
                 storage_options: dict[str, Any] | None = None, fetch: bool = False,
                 allow_missing_scale: bool = False, checksum: bool = False, device: str = "auto",
                 dequant_backend: str = "auto", fix_dtypes: bool = False,
                 allow_dtypes: list[str] | None = None) -> dict[str, Any]:
    """Convert the checkpoint at `source` into `dest`; returns a summary of what was done."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    work = work or default_work(dest)
    allowed = tuple(allow_dtypes or ())
    src = open_location(source, storage_options)
    if fetch and not src.is_local:
        src = _fetch(src, work, storage_options)
    ckpt = scan_checkpoint(src)
    for w in check(ckpt):
        logger.warning("%s", w)
    plan = build_plan(ckpt, dequant, fix_dtypes, allow_missing_scale, allowed)
    for w in plan.warnings:
        logger.warning("%s", w)
    dst = open_location(dest, storage_options)
    _prepare_dest(src, dst)
    progress.set_totals(plan.total_size, len(plan.shards))
    records = run_shards(plan, ckpt, src, dst, work, storage_options, checksum,
                         resolve_device(device), dequant_backend)
    finalize(plan, ckpt, src, dst)
    written, report = verify_output(dst, allowed)
    summary = summarize(plan, records, report, time.perf_counter() - t0)
    summary.update(source=source, dest=dest, work=work)
    publish_summary(summary)
    logger.info("converted %d shard(s) (%d cached) into %s in %.1fs", summary["shards"],
                summary["cached_shards"], dest, summary["seconds"])
    return summary


def summarize(plan: StagePlan, records: list[dict[str, Any]], report: DtypeReport, seconds: float) -> dict[str, Any]:
    computed = [r for r in records if not r["cached"]]
    compute_s = sum(r.get("seconds", 0.0) for r in computed)
    in_bytes = sum(r.get("source_bytes", 0) for r in computed)
    return {
        "stage": plan.stage, "shards": len(records), "cached_shards": len(records) - len(computed),
        "tensors": sum(r["tensors"] for r in records), "bytes_written": plan.total_size,
        "source_bytes": plan.source_bytes, "dropped_tensors": len(plan.dropped),
        "seconds": round(seconds, 3), "shard_seconds": round(compute_s, 3),
        "gb_per_s_in": round(in_bytes / compute_s / 1e9, 3) if compute_s else None,
        "dtypes": {r["dtype"]: r["tensors"] for r in report.rows()}, "records": records,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (not the Prefect server's, a separate process)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

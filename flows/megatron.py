"""The Megatron flow: import (safe unpickle + mapping) → shard → finalize → verify.

`ckptflow megatron SOURCE DEST [--tokenizer PATH] [--config FILE] [--table FILE|URL]`: SOURCE is
a `.pt`, a Megatron checkpoint directory (`release/` or `iter_…/` with `mp_rank_0X/`), or NVIDIA's
`.zip`, on any fsspec URL; `--table` replaces the built-in Megatron → GPT-2 name table. Both
passes are cached like the convert flow's shards.

`megatron_preflight` (tasks/megatron/preflight.py, no Prefect; re-exported here) makes every check
the import task makes that needs no tensor bytes, in bounded memory: the CLI calls it before it
imports Prefect. The flow makes them again before it locks or writes DEST, and the import task
once more before it unpickles.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.files import WEIGHT_SUFFIXES, list_files, read_json
from ckptflow.storage.listing import file_identity
from ckptflow.storage.lock import dest_lock
from ckptflow.storage.overlap import refuse_overlap
from ckptflow.storage.remote import check_writable_dest
from ckptflow.storage.reader import file_info
from ckptflow.storage.urls import Location, StorageError, open_location
from ckptflow.tasks.megatron.preflight import megatron_preflight, preflight as _preflight  # noqa: F401 (re-exported)
from ckptflow.tasks.megatron.task import IMPORTED, import_megatron
from ckptflow.tasks.plan.sizes import parse_size
from ckptflow.tasks.presets.megatron import load_megatron_table
from ckptflow.tasks.planners.by_size import plan_size_shards
from ckptflow.tasks.run.progress import reporting_to
from ckptflow.tasks.run.passes import finalize, prepare_dest, run_shards, verify_output

from ckptflow.flows.runtime.process import runtime_of
from ckptflow.flows.params import RuntimeParameter, ShardSize
from ckptflow.flows.report import RunProgress, publish_dtype_report, publish_summary
from ckptflow.flows.dead_runs import mark_crashed, owner_record
from ckptflow.flows.passes import PrefectSubmitter
from ckptflow.flows.workdir import default_work, result_storage


def source_fingerprints(src: Location) -> list[tuple[str, int, str | None]]:
    """(name, size, version) of the source file, or of every file under a source directory."""
    if src.fs.isfile(src.root):
        info = file_info(src, "")
        return [(src.url, info["size"], info["version"])]
    return [(n, size, file_info(src, n)["version"]) for n, size in list_files(src).items()]


def _copy_tokenizer(tokenizer: str, dst: Location, storage_options: dict[str, Any] | None) -> list[str]:
    from ckptflow.storage.files import copy_file

    tok = open_location(tokenizer, storage_options)
    names = [n for n in list_files(tok) if not n.endswith(WEIGHT_SUFFIXES)
             and n != "config.json"]
    if not names:
        raise StorageError(f"--tokenizer {tokenizer}: no tokenizer files found there")
    for n in names:
        copy_file(tok, dst, n)
    return names


def _import(source: str, stage_loc: Location, fps: list[tuple[str, int, str | None]], override: Any,
            table: dict[str, Any] | None, work: str, storage_options: dict[str, Any] | None,
            ) -> tuple[dict[str, Any], bool]:
    """Run (or reuse) the import task; returns its record and whether it was reused.

    A cached record is trusted only while the file it committed is untouched (same identity)
    and config.json is there; anything else imports again. A user's table travels as its
    content, so the cache key follows what it says and a worker needs no access to its URL."""
    storage = result_storage(work, storage_options)
    params: dict[str, Any] = {"config_override": override}
    if table is not None:  # absent for the built-in table: cache keys stay as they were
        params["table"] = table
    for refresh in (False, True):
        task = import_megatron.with_options(result_storage=storage, refresh_cache=refresh)
        fut = task.submit("megatron-import", source, stage_loc.url, fps, params, storage_options)
        imported = dict(fut.result())
        cached = fut.state.name == "Cached"
        if not cached or (imported.get("identity") == file_identity(stage_loc, IMPORTED)
                          and stage_loc.fs.exists(stage_loc.path("config.json"))):
            return imported, cached
    raise AssertionError("unreachable: a refreshed import is never Cached")


@flow(name="ckptflow-megatron", task_runner=ThreadPoolTaskRunner(max_workers=1))
def megatron_flow(source: str, dest: str, tokenizer: str | None = None, config: str | None = None,
                  max_shard_size: ShardSize = "5GB", work: str | None = None,
                  storage_options: dict[str, Any] | None = None, table: str | None = None,
                  runtime: RuntimeParameter = None) -> dict[str, Any]:
    """Convert a Megatron-LM GPT-2 checkpoint into a Hugging Face GPT-2 one. `runtime`: the CLI's,
    in-process only (see `convert_flow`)."""
    sink = runtime_of(runtime).progress_for_flow()
    logger = get_run_logger()
    t0 = time.perf_counter()
    work = work or default_work(dest)
    src = open_location(source, storage_options)
    if not src.fs.exists(src.root):
        raise StorageError(f"{source}: not found")
    dst = open_location(dest, storage_options)
    refuse_overlap(("SOURCE", src), ("DEST", dst), ("--work", open_location(work, storage_options)))
    override = None
    if config:
        cfg_loc = open_location(config, storage_options)
        override = read_json(cfg_loc, "")
    mapping = load_megatron_table(table, storage_options) if table else None
    table_content = {"source": table, "doc": mapping.model_dump(mode="json")} if mapping else None
    size = parse_size(max_shard_size)
    stage_loc = open_location(f"{work.rstrip('/')}/stages/megatron", storage_options)
    fps = source_fingerprints(src)
    _preflight(source, override, mapping, storage_options)  # a hostile SOURCE is refused before DEST is touched
    check_writable_dest(dst)
    with dest_lock(dst, owner_record(), mark_crashed), dest_lock(stage_loc):
        imported, import_cached = _import(source, stage_loc, fps, override, table_content, work, storage_options)
        ckpt = scan_checkpoint(stage_loc)
        plan = plan_size_shards(ckpt, size, stage="megatron-shard")
        prepare_dest(dst, {shard.file for shard in plan.shards}, protected=(src,))
        run_progress = RunProgress(len(plan.shards), plan.total_size)
        sink.set_totals(plan.total_size, len(plan.shards))
        with reporting_to(sink):
            records = run_shards(plan, ckpt, stage_loc, dst, work, storage_options,
                                 PrefectSubmitter(work, storage_options), on_commit=run_progress.shard_committed,
                                 progress=sink)
        finalize(plan, ckpt, stage_loc, dst)
        if tokenizer:
            logger.info("copied tokenizer files: %s", ", ".join(_copy_tokenizer(tokenizer, dst, storage_options)))
        written, report = verify_output(dst, plan, (), publish_dtype_report)
    cached = sum(r.get("cached", False) for r in records)
    summary = {
        "stage": "megatron", "source": source, "dest": dest, "work": work,
        "shards": len(records), "cached_shards": cached, "import_cached": import_cached,
        "tensors": sum(r["tensors"] for r in records), "bytes_written": plan.total_size,
        "source_bytes": imported.get("source_bytes", 0), "dropped_tensors": 0,
        "seconds": round(time.perf_counter() - t0, 3), "shard_seconds": imported.get("seconds", 0.0),
        "gb_per_s_in": None, "tp": imported.get("tp"), "checkpoint_version": imported.get("checkpoint_version"),
        "dtypes": {r["dtype"]: r["tensors"] for r in report.rows()}, "records": records,
    }
    publish_summary(summary)
    return summary

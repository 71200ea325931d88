"""`ckptflow megatron SOURCE DEST` for Megatron-Core checkpoints (torch_dist or legacy mp_rank_*).

Found by layout and planned from the index before DEST is touched (`tasks.mcore.source`: what the
CLI's pre-flight, `--dry-run` and `inspect` call, without Prefect). The flow hands the plan to the
engine (one journaled shard task per output shard, resumable) and copies tokenizer files last.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.storage.overlap import refuse_overlap
from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.plan import plan_summary, source_checkpoint
from ckptflow.tasks.mcore.source import plan_megatron_core
from ckptflow.tasks.run.engine import EngineHooks, EnginePass, run_conversion

from ckptflow.flows.dead_runs import mark_crashed, owner_record
from ckptflow.flows.params import RuntimeParameter
from ckptflow.flows.passes import PrefectSubmitter
from ckptflow.flows.runtime.process import runtime_of
from ckptflow.flows.report import RunProgress, publish_dtype_report, publish_summary
from ckptflow.flows.workdir import default_work


@flow(name="ckptflow-megatron-core", task_runner=ThreadPoolTaskRunner(max_workers=1))
def megatron_core_flow(source: str, dest: str, tokenizer: str | None = None, config: str | None = None,
                       family: str | None = None, table: str | None = None, max_shard_size: str = "5GB",
                       work: str | None = None, storage_options: dict[str, Any] | None = None,
                       runtime: RuntimeParameter = None) -> dict[str, Any]:
    """Convert a Megatron-Core checkpoint into a Hugging Face one (shards by size, journaled).
    `runtime`: the CLI's, in-process only (see `convert_flow`)."""
    from ckptflow.flows.megatron import _copy_tokenizer

    rt = runtime_of(runtime)
    sink = rt.progress_for_flow()
    logger = get_run_logger()
    t0 = time.perf_counter()
    work = work or default_work(dest)
    src_root, dst = open_location(source, storage_options), open_location(dest, storage_options)
    refuse_overlap(("SOURCE", src_root), ("DEST", dst), ("--work", open_location(work, storage_options)))
    asked = (source, config, tokenizer, family, table, max_shard_size, storage_options)
    if isinstance(rt.plan, tuple) and rt.plan[0] == asked:  # the CLI's, made before Prefect started
        index, mp = rt.plan[1:]
    else:
        index, mp = plan_megatron_core(*asked)
    src = open_location(index.root, storage_options)  # the iteration folder: chunk files are relative to it
    ckpt = source_checkpoint(index, mp.plan, src)
    progress = RunProgress(len(mp.plan.shards), mp.plan.total_size)
    sink.set_totals(mp.plan.total_size, len(mp.plan.shards))
    hooks = EngineHooks(on_commit=progress.shard_committed, on_dtype_report=publish_dtype_report,
                        lock_owner=owner_record(), on_takeover=mark_crashed, progress=sink)
    result = run_conversion(ckpt, [EnginePass(mp.plan)], src, dst, work, storage_options,
                            submitter=PrefectSubmitter(work, storage_options), protected=(src_root,), hooks=hooks)
    if tokenizer:
        logger.info("copied tokenizer files: %s", ", ".join(_copy_tokenizer(tokenizer, dst, storage_options)))
    records = result.records
    fresh = [r for r in records if not r["cached"]]
    shard_s = round(sum(r.get("seconds", 0.0) for r in fresh), 3)
    read = sum(r.get("source_bytes", 0) for r in fresh)
    summary = {"stage": "megatron-core", "source": source, "dest": dest, "work": work, **plan_summary(index, mp),
               "cached_shards": len(records) - len(fresh), "source_bytes": read,
               "bytes_written": sum(r.get("size", 0) for r in fresh), "shard_seconds": shard_s,
               "gb_per_s_in": round(read / shard_s / 1e9, 3) if shard_s else None,
               "dtypes": {r["dtype"]: r["tensors"] for r in result.report.rows()},
               "seconds": round(time.perf_counter() - t0, 3), "records": records}
    publish_summary(summary)
    return summary



"""The convert flow: validate → (fetch) → dequant / fix dtypes / reindex / MP → finalize → verify.

A thin wrapper over the engine (`ckptflow.tasks.run.engine.run_conversion`): it plans (or takes
the CLI's plan), hands the engine a Prefect submitter (one task per output shard on the flow
run's task runner), and publishes the summary. The commit journal in the work location decides
what a rerun reuses, so a rerun of the same command after a crash skips every committed shard.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.storage.overlap import refuse_overlap
from ckptflow.storage.urls import open_location
from ckptflow.tasks.run.progress import reporting_to
from ckptflow.tasks.run.engine import EngineHooks, run_conversion
from ckptflow.tasks.kernels.device import resolve_device
from ckptflow.tasks.planners.torch_dtype import DtypeReport
from ckptflow.tasks.plan.model import StagePlan

from ckptflow.flows.dry_run import tensor_actions
from ckptflow.flows.params import ConvertOptions, Recipe, RuntimeParameter, flow_signature
from ckptflow.flows.preflight import plan_conversion
from ckptflow.flows.report import RunProgress, publish_dtype_report, publish_summary
from ckptflow.flows.runtime.process import Runtime, runtime_of
from ckptflow.flows.runtime.runners import GPU_TAG, SHARD_TAG, make_task_runner, runner_settings
from ckptflow.flows.passes import PrefectSubmitter, fetch_source
from ckptflow.flows.dead_runs import mark_crashed, owner_record
from ckptflow.flows.workdir import check_work_reachable, default_work


def convert_flow(source: str, dest: str, work: str | None = None,
                 storage_options: dict[str, Any] | None = None, runtime: RuntimeParameter = None,
                 **options: Any) -> dict[str, Any]:
    """Convert the checkpoint at `source` into `dest`; returns a summary of what was done.

    The other parameters are the fields of `ConvertOptions` (`ckptflow.flows.params`), which also
    make the CLI's flags. `task_runner`/`dask_address`/`max_workers` pick where shard tasks run
    (`ckptflow.flows.runtime.runners`). The CLI applies the runner with `with_options`; a run whose runner
    is not the one asked for (a deployment run with `task_runner: dask` or `max_workers: 4`)
    submits its shard tasks to that runner, within the same flow run. `prune` deletes weight files in `dest` this run
    does not write (else they stop the run before it writes anything).

    `runtime` is the CLI's `Runtime` (`ckptflow.flows.runtime.process`), in-process only: its
    server handle, its plan (reused if no file changed) and its progress sink. Prefect records it
    as `"<Runtime>"`, never its contents; a deployment run leaves it unset and plans for itself.
    """
    opts = ConvertOptions(**options)
    rt = runtime_of(runtime)
    current = FlowRunContext.get()
    if current is not None:
        runner = make_task_runner(opts.task_runner, opts.max_workers, opts.dask_address, rt.server)
        if runner_settings(current.task_runner) != runner_settings(runner):
            # A deployment run asks for another runner as a parameter: shard tasks go to it from
            # within this same flow run (no subflow), so the operator's run is the one that holds
            # the task runs, logs and artifacts.
            with runner, current.model_copy(update={"task_runner": runner}):
                return _convert(source, dest, work, storage_options, opts, rt)
    return _convert(source, dest, work, storage_options, opts, rt)


def _convert(source: str, dest: str, work: str | None, storage_options: dict[str, Any] | None,
             opts: ConvertOptions, rt: Runtime) -> dict[str, Any]:
    logger = get_run_logger()
    t0 = time.perf_counter()
    work = work or default_work(dest)
    recipe = opts.recipe()
    src = open_location(source, storage_options)
    dst = open_location(dest, storage_options)
    work_loc = open_location(work, storage_options)
    refuse_overlap(("SOURCE", src), ("DEST", dst), ("--work", work_loc))
    check_work_reachable(work_loc, opts.dask_address)
    origin = src
    sink = rt.progress_for_flow()  # this conversion's own counts: a watch run's others never mix in
    if opts.fetch and not src.is_local:
        with reporting_to(sink):
            src = fetch_source(src, work, storage_options)
    # The same checks and plan the CLI made before Prefect started (reused when it did).
    planned = plan_conversion(src, recipe, made=rt.plan)
    ckpt, warnings = planned.ckpt, list(planned.warnings)
    for w in warnings:
        logger.warning("%s", w)
    device = resolve_device(opts.device)  # imports torch only where a GPU could be visible
    sink.set_totals(planned.total_bytes, planned.total_shards)
    run_progress = RunProgress(planned.total_shards, planned.total_bytes)
    # Tagged so a Prefect tag concurrency limit caps shard tasks (GPU ones apart) on every worker.
    shard_tags = (SHARD_TAG, *([GPU_TAG] if device.startswith("cuda") else []))
    hooks = EngineHooks(on_commit=run_progress.shard_committed, on_dtype_report=publish_dtype_report,
                        lock_owner=owner_record(), on_takeover=mark_crashed, around_pass=lambda: tags(*shard_tags),
                        progress=sink)
    result = run_conversion(ckpt, planned.engine_passes(), src, dst, work, storage_options,
                            submitter=PrefectSubmitter(work, storage_options), protected=(origin,), prune=opts.prune,
                            checksum=opts.checksum, device=device, backend=opts.dequant_backend,
                            allow_dtypes=recipe.allow_dtypes or (), hooks=hooks)
    records, report, notes = result.records, result.report, result.notes
    per_pass = [pass_summary(r.plan, r.records, r.into) for r in result.passes]
    summary = summarize(recipe, [r.plan for r in result.passes], records, report, time.perf_counter() - t0)
    summary.update(passes=per_pass, notes=notes)
    summary.update(source=source, dest=dest, work=work, warnings=warnings)
    publish_summary(summary)
    logger.info("converted %d shard(s) (%d cached) into %s in %.1fs", summary["shards"],
                summary["cached_shards"], dest, summary["seconds"])
    return summary


def pass_summary(plan: StagePlan, records: list[dict[str, Any]], into: str) -> dict[str, Any]:
    """What one pass did in this run: written now and reused (an earlier run's) counted apart."""
    fresh = [r for r in records if not r["cached"]]
    reused = [r for r in records if r["cached"]]
    nbytes = tensor_bytes([plan])
    return {"stage": plan.stage, "into": into, "shards": len(records), "cached_shards": len(reused),
            "tensors": sum(r["tensors"] for r in fresh), "reused_tensors": sum(r["tensors"] for r in reused),
            "source_bytes": sum(r.get("source_bytes", 0) for r in fresh),
            "bytes_written": sum(nbytes(r) for r in fresh), "reused_bytes": sum(nbytes(r) for r in reused),
            "dropped_tensors": len(plan.dropped), "actions": tensor_actions(plan)}


def tensor_bytes(plans: list[StagePlan]) -> Any:
    """record → the tensor bytes of its shard (as the index's total_size counts them, headers
    not included), looked up by (stage, file) in the plans."""
    sizes = {(p.stage, s.file): s.nbytes for p in plans for s in p.shards}
    return lambda r: sizes.get((r.get("stage"), r.get("name")), int(r.get("size", 0)))



convert_flow.__signature__ = flow_signature(convert_flow, ConvertOptions)  # type: ignore[attr-defined]
convert_flow = flow(name="ckptflow-convert", task_runner=ThreadPoolTaskRunner(max_workers=1),
                    log_prints=True)(convert_flow)


def summarize(recipe: Recipe, plans: list[StagePlan], records: list[dict[str, Any]], report: DtypeReport,
              seconds: float) -> dict[str, Any]:
    """The run's numbers, every pass together: `tensors`, `source_bytes` and `bytes_written` count
    what this run read and wrote (a cached rerun reads and writes nothing); what reused shards hold
    is counted apart (`reused_*`); `output_*` describe the finished DEST."""
    computed = [r for r in records if not r["cached"]]
    reused = [r for r in records if r["cached"]]
    nbytes = tensor_bytes(plans)
    compute_s = sum(r.get("seconds", 0.0) for r in computed)
    in_bytes = sum(r.get("source_bytes", 0) for r in computed)
    return {
        "stage": "+".join(recipe.stages()), "shards": len(records), "cached_shards": len(reused),
        "tensors": sum(r["tensors"] for r in computed), "reused_tensors": sum(r["tensors"] for r in reused),
        "source_bytes": in_bytes, "bytes_written": sum(nbytes(r) for r in computed),
        "reused_bytes": sum(nbytes(r) for r in reused),
        "output_bytes": plans[-1].total_size, "output_tensors": sum(len(s.tensors) for s in plans[-1].shards),
        "dropped_tensors": sum(len(p.dropped) for p in plans),
        "dropped_unmatched": [n for p in plans for n in p.dropped_unmatched],
        "seconds": round(seconds, 3), "shard_seconds": round(compute_s, 3),
        "gb_per_s_in": round(in_bytes / compute_s / 1e9, 3) if compute_s else None,
        "dtypes": {r["dtype"]: r["tensors"] for r in report.rows()}, "records": records,
        "nonfinite": nonfinite_counts(records),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def nonfinite_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """inf/NaN that dequant wrote from finite codes (`--allow-nonfinite`), per output file and
    tensor, reused shards included (their journal records carry the counts)."""
    tensors = [{"file": r.get("name"), "tensor": name, "count": n}
               for r in records for name, n in sorted((r.get("nonfinite") or {}).items())]
    return {"values": sum(t["count"] for t in tensors), "tensors": tensors}


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (not the Prefect server's, a separate process).

    VmHWM, not getrusage: Linux carries the parent's high-water mark into a child's ru_maxrss
    across fork + exec, so a child of a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

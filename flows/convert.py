"""The convert flow: validate → (fetch) → dequant / fix dtypes / reindex / MP → finalize → verify.

A thin wrapper over the engine's whole conversion (`ckptflow.flows.conversion.run_convert`,
which plans or takes the CLI's plan, runs every pass and returns the summary): it hands it a
Prefect submitter (one task per output shard on the flow run's task runner), Prefect fetch tasks,
tags and artifacts, then publishes the summary. The commit journal in the work location decides
what a rerun reuses, so a rerun of the same command after a crash skips every committed shard.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.flows.conversion import run_convert
from ckptflow.tasks.run.engine import EngineHooks

from ckptflow.flows.params import ConvertOptions, RuntimeParameter, flow_signature
from ckptflow.flows.preflight import Preflight
from ckptflow.flows.report import RunProgress, publish_dtype_report, publish_summary
from ckptflow.flows.runtime.process import Runtime, runtime_of
from ckptflow.flows.runtime.runners import GPU_TAG, SHARD_TAG, make_task_runner, runner_settings
from ckptflow.flows.passes import PrefectSubmitter, fetch_source
from ckptflow.flows.dead_runs import mark_crashed, owner_record
from ckptflow.flows.workdir import default_work


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
        runner = make_task_runner(opts.task_runner, opts.max_workers, opts.dask_address, rt.server,
                                  cli_interrupt=rt.handles_ctrl_c)
        if runner_settings(current.task_runner) != runner_settings(runner):
            # A deployment run asks for another runner as a parameter: shard tasks go to it from
            # within this same flow run (no subflow), so the operator's run is the one that holds
            # the task runs, logs and artifacts.
            with runner, current.model_copy(update={"task_runner": runner}):
                return _convert(source, dest, work, storage_options, opts, rt)
    return _convert(source, dest, work, storage_options, opts, rt)


def _convert(source: str, dest: str, work: str | None, storage_options: dict[str, Any] | None,
             opts: ConvertOptions, rt: Runtime) -> dict[str, Any]:
    """The engine's whole conversion (`run_convert`) with Prefect's parts handed in: shard tasks,
    fetch tasks, tags, artifacts, the lock record's flow run; then the summary artifact and log."""
    logger = get_run_logger()
    work = work or default_work(dest)
    summary = run_convert(source, dest, work, storage_options, opts, plan=rt.plan,
                          submitter=lambda: PrefectSubmitter(work, storage_options), hooks=_prefect_hooks,
                          # this conversion's own counts: a watch run's others never mix in
                          progress=rt.progress_for_flow, fetch=fetch_source, logger=logger)
    publish_summary(summary)
    logger.info("converted %d shard(s) (%d cached) into %s in %.1fs", summary["shards"],
                summary["cached_shards"], dest, summary["seconds"])
    return summary


def _prefect_hooks(planned: Preflight, device: str) -> EngineHooks:
    """What Prefect adds to the engine's run: the progress artifact, the dtype report, the flow run
    in DEST's lock record (a takeover marks a dead run Crashed) and tags on the shard tasks."""
    run_progress = RunProgress(planned.total_shards, planned.total_bytes)
    # Tagged so a Prefect tag concurrency limit caps shard tasks (GPU ones apart) on every worker.
    shard_tags = (SHARD_TAG, *([GPU_TAG] if device.startswith("cuda") else []))
    return EngineHooks(on_commit=run_progress.shard_committed, on_dtype_report=publish_dtype_report,
                       lock_owner=owner_record(), on_takeover=mark_crashed, around_pass=lambda: tags(*shard_tags))


convert_flow.__signature__ = flow_signature(convert_flow, ConvertOptions)  # type: ignore[attr-defined]
convert_flow = flow(name="ckptflow-convert", task_runner=ThreadPoolTaskRunner(max_workers=1),
                    log_prints=True)(convert_flow)


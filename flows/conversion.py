"""One whole conversion with no orchestrator: open the locations, refuse overlap, check the work
location, fetch a remote source if asked, plan (or reuse the CLI's plan), resolve the device, run
every pass on the engine, and return the run's summary.

`convert_flow` (`ckptflow.flows.convert`) is this plus Prefect: it hands in a Prefect submitter,
a Prefect fetch, and hooks that tag shard tasks and publish artifacts, then publishes the summary.
Tests, benches and scripts call `run_convert` directly; nothing on its path imports Prefect (a
remote `fetch=True` source without a `fetch` callable is the one exception: the default fetch
runs `tasks/fetch.py`'s copy function, and that module imports Prefect's task decorator).

It lives in flows/ beside the recipes and the preflight it plans with (`ckptflow.flows.params`,
`ckptflow.flows.preflight`: pure, no Prefect), as the layers go: flows → tasks → storage.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Union

from ckptflow.storage.overlap import refuse_overlap
from ckptflow.storage.urls import Location, open_location
from ckptflow.tasks.kernels.device import resolve_device
from ckptflow.tasks.run.engine import EngineHooks, run_conversion
from ckptflow.tasks.run.progress import ProgressSink, reporting_to
from ckptflow.tasks.run.submit import SerialSubmitter, Submitter, ThreadSubmitter
from ckptflow.tasks.run.summary import pass_summary, summarize

from ckptflow.flows.params import ConvertOptions
from ckptflow.flows.preflight import Preflight, plan_conversion
from ckptflow.flows.workdir import check_work_reachable, default_work

# (plan, resolved device) → the hooks of this run: what a caller adds knowing both (Prefect tags
# by device, a progress artifact sized by the plan).
HooksFor = Callable[[Preflight, str], EngineHooks]
# (remote source, work, storage options) → the fetched copy under `<work>/source`.
Fetch = Callable[[Location, str, Union[dict[str, Any], None]], Location]

log = logging.getLogger("ckptflow.engine")


def run_convert(source: str, dest: str, work: str | None = None, storage_options: dict[str, Any] | None = None,
                options: ConvertOptions | None = None, *, plan: Preflight | None = None,
                submitter: Submitter | Callable[[], Submitter] | None = None,
                hooks: EngineHooks | HooksFor | None = None,
                progress: ProgressSink | Callable[[], ProgressSink] | None = None, fetch: Fetch | None = None,
                logger: Any = None, keep_intermediates: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Convert the checkpoint at `source` into `dest`; returns the summary `convert_flow` returns.

    `options` (or its fields as keyword arguments) are `ConvertOptions`; `task_runner` is the
    flow's business and ignored here. `plan` is a plan made earlier in this process (the CLI's),
    reused if nothing changed (`plan_conversion(made=)`). `submitter` runs shard work: default,
    this thread, or a pool of `max_workers` threads when that is above 1. `hooks` is an
    `EngineHooks`, or a function of (plan, device) that makes one; its `progress` is `progress`
    (a fresh sink by default). `submitter` and `progress` may be functions that make one: called
    only once the inputs passed their checks (a Prefect submitter creates `<work>/results`; a
    runtime hands its sink with the terminal's bars to one conversion). `keep_intermediates`: a
    two-pass run keeps its pass output under the work location (tests compare it). Raises the
    `UserError` a bad input calls for, before a byte is written.
    """
    if options is not None and kwargs:
        raise TypeError("run_convert takes ConvertOptions or its fields, not both")
    opts = options if options is not None else ConvertOptions(**kwargs)
    logger = logger if logger is not None else log
    t0 = time.perf_counter()
    work = work or default_work(dest)
    recipe = opts.recipe()
    src = open_location(source, storage_options)
    dst = open_location(dest, storage_options)
    work_loc = open_location(work, storage_options)
    refuse_overlap(("SOURCE", src), ("DEST", dst), ("--work", work_loc))
    check_work_reachable(work_loc, opts.dask_address)
    origin = src
    sink = progress() if callable(progress) else (progress or ProgressSink())
    if opts.fetch and not src.is_local:
        with reporting_to(sink):
            src = (fetch or fetch_here)(src, work, storage_options)
    # The same checks and plan the CLI made before Prefect started (reused when it did).
    planned = plan_conversion(src, recipe, made=plan)
    ckpt, warnings = planned.ckpt, list(planned.warnings)
    for w in warnings:
        logger.warning("%s", w)
    device = resolve_device(opts.device)  # imports torch only where a GPU could be visible
    sink.set_totals(planned.total_bytes, planned.total_shards)
    made = hooks(planned, device) if callable(hooks) else (hooks or EngineHooks())
    engine_hooks = dataclasses.replace(made, progress=sink)
    own = submitter is None and (opts.max_workers or 1) > 1
    if submitter is None:
        runner: Any = ThreadSubmitter(opts.max_workers or 1) if own else SerialSubmitter()
    else:
        runner = submitter if hasattr(submitter, "submit") else submitter()  # type: ignore[operator]
    try:
        result = run_conversion(ckpt, planned.engine_passes(), src, dst, work, storage_options,
                                submitter=runner, protected=(origin,), prune=opts.prune,
                                checksum=opts.checksum, device=device, backend=opts.dequant_backend,
                                allow_dtypes=recipe.allow_dtypes or (), keep_intermediates=keep_intermediates,
                                hooks=engine_hooks)
    finally:
        if own:
            runner.close()
    per_pass = [pass_summary(r.plan, r.records, r.into) for r in result.passes]
    summary = summarize(recipe, [r.plan for r in result.passes], result.records, result.report,
                        time.perf_counter() - t0)
    summary.update(passes=per_pass, notes=result.notes)
    summary.update(source=source, dest=dest, work=work, warnings=warnings)
    return summary


def fetch_here(src: Location, work: str, storage_options: dict[str, Any] | None) -> Location:
    """Copy the source into `<work>/source` in this thread, skipping files fetched and verified
    before: the flow's fetch (`ckptflow.flows.passes.fetch_source`) without Prefect tasks."""
    from ckptflow.storage.files import list_files
    from ckptflow.tasks.fetch import fetch_file, plan_fetch, read_markers, source_listing

    dst = open_location(f"{work.rstrip('/')}/source", storage_options)
    names = list(list_files(src))
    listing = source_listing(src, names)
    local = list_files(dst) if dst.fs.exists(dst.root) else {}
    todo = plan_fetch(listing, read_markers(dst, names, local), local)
    for n in todo:
        fetch_file.fn(src.url, dst.url, n, listing[n], storage_options)
    log.info("fetched %d file(s), %d already present", len(todo), len(names) - len(todo))
    return dst

"""The watch flow: convert every checkpoint under a prefix whose output is missing or stale.

Meant for a schedule (`deployments/prefect.yaml`, `watch-incoming`): each run lists
`source_prefix` once, decides with `ckptflow.tasks.planners.watch` which checkpoints need converting, and
runs `convert_flow` for each as its own subflow run, `max_concurrent` at a time. A conversion
that dies resumes at the next run from its committed shards (each checkpoint has its own work
location); one checkpoint failing does not stop the others, but fails the watch run.

`watch_once` is the run itself, whatever runs its conversions: the flow submits each to Prefect
as a task whose body is a subflow run; `watch_without_prefect` hands each to a thread and a
conversion function of the caller's (tests pass the engine's), with no flow run at all.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ContextManager

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.storage.errors import problem_list
from ckptflow.storage.errors import UserError
from ckptflow.storage.files import write_json
from ckptflow.storage.listing import list_tree
from ckptflow.storage.overlap import open_watch_prefixes
from ckptflow.storage.remote import check_writable_dest
from ckptflow.storage.urls import Location, open_location
from ckptflow.tasks.planners.watch import MARKER_NAME, WatchPlan, marker

from ckptflow.flows.convert import convert_flow
from ckptflow.flows.params import ConvertOptions, NonNegative, Positive, RuntimeParameter
from ckptflow.flows.printable import printable
from ckptflow.flows.runtime.process import Runtime, runtime_of
from ckptflow.flows.runtime.runners import check_runner, make_task_runner
from ckptflow.flows.watch_scan import scan_watch, watch_summary


class WatchFailed(UserError):
    """Some conversions of a watch run failed (each is named with its error); `summary` is the
    run's report all the same."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


# (source, dest, work, options, storage_options) → that conversion's summary (`convert_flow`'s keys)
ConvertOne = Callable[..., dict[str, Any]]
# the parameters of one checkpoint's `convert_and_mark` → a future (its `.result()`)
Submit = Callable[[dict[str, Any]], Any]


def convert_and_mark(name: str, source: str, dest: str, work: str, options: dict[str, Any], fingerprint: str,
                     storage_options: dict[str, Any] | None, convert: ConvertOne) -> dict[str, Any]:
    """One checkpoint: its conversion by `convert`, then the marker that says it is done.

    The watch owns `dest`: weight files an earlier conversion left there with another layout are
    pruned."""
    options = {**options, "prune": True}
    summary = convert(source=source, dest=dest, work=work, options=options, storage_options=storage_options)
    output = list_tree(open_location(dest, storage_options))
    recipe = ConvertOptions(**options).recipe_key()
    write_json(open_location(work, storage_options), MARKER_NAME, marker(fingerprint, recipe, dest, output))
    return {k: summary[k] for k in ("shards", "cached_shards", "bytes_written", "seconds")}


@task(name="convert-checkpoint", cache_policy=NO_CACHE, persist_result=False)
def convert_checkpoint(name: str, source: str, dest: str, work: str, options: dict[str, Any],
                       fingerprint: str, storage_options: dict[str, Any] | None,
                       runtime: Runtime | None = None) -> dict[str, Any]:
    """One checkpoint as a `convert_flow` subflow run (`convert_and_mark`). Each conversion counts
    on a progress sink of its own (the runtime's `progress_for_flow`), so conversions running at
    once never mix their counts."""
    rt = runtime_of(runtime)
    runner = make_task_runner(options["task_runner"], options["max_workers"], options["dask_address"], rt.server,
                              cli_interrupt=rt.handles_ctrl_c)

    def subflow(options: dict[str, Any], **where: Any) -> dict[str, Any]:
        return convert_flow.with_options(flow_run_name=f"convert-{name}", task_runner=runner)(
            **where, runtime=rt, **options)

    return convert_and_mark(name, source, dest, work, options, fingerprint, storage_options, subflow)


@flow(name="ckptflow-watch", log_prints=True)
def watch_flow(source_prefix: str, dest_prefix: str, options: ConvertOptions = ConvertOptions(),
               work_prefix: str | None = None, max_concurrent: Positive = 2,
               settle_seconds: NonNegative = 600, dry_run: bool = False,
               storage_options: dict[str, Any] | None = None, runtime: RuntimeParameter = None) -> dict[str, Any]:
    """Convert each checkpoint `source_prefix/<name>` into `dest_prefix/<name>` unless its output
    is up to date; `work_prefix/<name>` (default `dest_prefix/.ckptflow-work/<name>`) holds its
    shard records and the marker of its last finished conversion. `runtime`: the CLI's, in-process
    only (see `convert_flow`)."""
    rt = runtime_of(runtime)
    check_runner(options.task_runner, options.dask_address, rt.server)  # once, not once per checkpoint

    @contextmanager
    def subflows() -> Iterator[Submit]:
        with ThreadPoolTaskRunner(max_workers=max_concurrent) as runner:
            yield lambda params: runner.submit(convert_checkpoint, parameters={**params, "runtime": rt})

    return watch_once(source_prefix, dest_prefix, options, work_prefix, settle_seconds, dry_run, storage_options,
                      get_run_logger(), subflows, publish_watch_summary)


def watch_without_prefect(source_prefix: str, dest_prefix: str, convert: ConvertOne,
                          options: ConvertOptions | dict[str, Any] = ConvertOptions(), work_prefix: str | None = None,
                          max_concurrent: int = 2, settle_seconds: float = 600, dry_run: bool = False,
                          storage_options: dict[str, Any] | None = None,
                          logger: Any = logging.getLogger("ckptflow.watch")) -> dict[str, Any]:
    """`watch_flow`'s run with no flow run: the same listings, decisions, markers, summary and
    `WatchFailed`, each conversion by `convert` (e.g. the engine's) on a pool of `max_concurrent`
    threads, and no artifact."""
    options = ConvertOptions.model_validate(options)  # a dict as a flow run's parameters take it

    @contextmanager
    def threads() -> Iterator[Submit]:
        with ThreadPoolExecutor(max_workers=max_concurrent) as pool:
            yield lambda params: pool.submit(convert_and_mark, **params, convert=convert)

    return watch_once(source_prefix, dest_prefix, options, work_prefix, settle_seconds, dry_run, storage_options,
                      logger, threads)


def watch_once(source_prefix: str, dest_prefix: str, options: ConvertOptions, work_prefix: str | None,
               settle_seconds: float, dry_run: bool, storage_options: dict[str, Any] | None, logger: Any,
               pool: Callable[[], ContextManager[Submit]],
               publish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One watch run, whatever runs its conversions: list, decide, convert what needs it (each
    submitted to `pool`'s submit), report; raises `WatchFailed` if a conversion failed."""
    src, dst, work = open_watch_prefixes(source_prefix, dest_prefix, work_prefix, storage_options)
    if not dry_run:
        check_writable_dest(dst)
    scan = scan_watch(src, dst, work, options.recipe_key(), settle_seconds, logger.warning)
    if not scan.found:
        logger.warning("%s: no checkpoints found (folders holding *.safetensors or %s)", source_prefix,
                       "model.safetensors.index.json")
    for d in scan.plan.decisions:
        logger.info("%s: %s (%s)", d.name, d.action, d.reason)
    results: dict[str, Any] = {}
    if scan.plan.to_convert() and not dry_run:
        with pool() as submit:
            results = run_conversions(scan.plan, src, dst, work, options, scan.found, storage_options, submit)
    summary = watch_summary(source_prefix, dest_prefix, scan.plan, dry_run, results)
    if publish is not None:
        publish(summary)
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    if failed:
        raise WatchFailed(f"{len(failed)} of {len(results)} conversion(s) failed:\n"
                          + problem_list(f"{n}: {e}" for n, e in failed.items()),
                          summary)
    return summary


def run_conversions(plan: WatchPlan, src: Location, dst: Location, work: Location, options: ConvertOptions,
                    found: dict[str, Any], storage_options: dict[str, Any] | None, submit: Submit) -> dict[str, Any]:
    """One conversion per checkpoint to convert, all submitted at once (the pool bounds how many run)."""
    results: dict[str, Any] = {}
    futures = {d.name: submit({
        "name": d.name, "source": src.url_of(d.name), "dest": dst.url_of(d.name),
        "work": work.url_of(d.name), "options": options.model_dump(),
        "fingerprint": found[d.name].fingerprint, "storage_options": storage_options})
        for d in plan.to_convert()}
    for name, fut in futures.items():
        try:
            results[name] = fut.result()
        except Exception as exc:  # noqa: BLE001 - reported per checkpoint; the others go on
            results[name] = {"error": str(exc) or type(exc).__name__}
    return results


def publish_watch_summary(summary: dict[str, Any]) -> None:
    rows = ["| checkpoint | action | reason | result |", "|---|---|---|---|"]
    for c in summary["checkpoints"]:
        r = c.get("result")
        result = ("–" if r is None else f"failed: {r['error'].splitlines()[0]}" if "error" in r
                  else f"{r['shards']} shards ({r['cached_shards']} cached), {r['bytes_written']:,} bytes")
        rows.append(f"| {printable(c['name'])} | {c['action']} | {printable(c['reason'])} | {result} |")
    head = f"### ckptflow watch `{summary['source_prefix']}` → `{summary['dest_prefix']}`"
    if summary["dry_run"]:
        head += " (dry run)"
    create_markdown_artifact(key="watch-summary", markdown=head + "\n\n" + "\n".join(rows),
                             description="checkpoints found and what was done")

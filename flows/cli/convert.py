"""`ckptflow convert`: options from flags, the checks and plan made before Prefect starts, the flow run."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ckptflow.flows.runtime.process import Runtime
from ckptflow.flows.cli.output import EXIT_USER_ERROR, print_json, text_out
from ckptflow.flows.summary_text import print_summary


def convert_options(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The `ConvertOptions` fields from a command line (`_add_convert_options` makes a flag of each);
    a command without those flags (`demo`) gets the defaults, and `fixed` on top."""
    from ckptflow.flows.params import ConvertOptions

    return {**{field: getattr(args, field, info.default) for field, info in ConvertOptions.model_fields.items()},
            **fixed}


def run_convert(args: argparse.Namespace, runtime: Runtime, source: str, dest: str, work: str | None,
                **fixed: Any) -> dict[str, Any]:
    from ckptflow.storage.urls import parse_storage_options

    from ckptflow.flows.params import ConvertOptions

    opts = parse_storage_options(getattr(args, "storage_options", None))
    # bad values fail here, one line each, before torch or Prefect load
    validated = ConvertOptions(**convert_options(args, **fixed))
    options = validated.model_dump()
    refuse_overlap_early(source, dest, work, opts, validated.dask_address)
    planned = plan_early(source, validated.recipe(), opts)
    runtime.plan = planned  # the flow reuses it (in this process; `plan_conversion(made=)`)
    if getattr(args, "dry_run", False):
        from ckptflow.flows.dry_run import dry_run_report

        from ckptflow.flows.workdir import default_work

        return dry_run_report(planned, source, dest, work or default_work(dest))
    server = runtime.server
    from ckptflow.flows.runtime.runners import make_task_runner, prestart_for

    prestart_for(server, runtime.owns_process, validated.task_runner, validated.dask_address)
    from ckptflow.flows.cli.bars import open_bars
    from ckptflow.flows.convert import convert_flow
    from ckptflow.flows.cli.run_link import linked

    sink = runtime.progress = runtime.new_progress(*open_bars(planned.total_bytes, planned.total_shards))
    # (totals from the first frame)
    from ckptflow.flows.summary_text import timing

    try:
        called = time.monotonic() - runtime.started  # from here on the wait is Prefect's: server, flow run
        server.ready()  # before the runner: local workers share this same temporary server
        runner = make_task_runner(options["task_runner"], options["max_workers"], options["dask_address"], server,
                                  cli_interrupt=runtime.handles_ctrl_c)
        summary = runtime.call(linked(convert_flow.with_options(task_runner=runner), server),
                               source=source, dest=dest, work=work, storage_options=opts or None, runtime=runtime,
                               **options)
        summary["timing"] = timing(summary, called, time.monotonic() - runtime.started, server.label())
        from ckptflow.flows.runtime.user_dirs import note

        if note():  # no HOME: where Prefect's records went
            summary["notes"] = [*summary.get("notes", []), note()]
        return summary
    finally:
        sink.close()


def plan_early(source: str, recipe: Any, opts: dict[str, Any]) -> Any:
    """Headers read, validated and every pass planned before Prefect (or torch) is imported: an
    input error is one `error:` line in about a second. The flow reuses this plan (same process,
    same files: handed over on the runtime) and plans itself when run any other way. A `--fetch`
    of a remote SOURCE plans on the remote headers here (range reads); the flow plans again on
    the fetched copy."""
    from ckptflow.storage.urls import open_location

    from ckptflow.flows.preflight import plan_conversion

    return plan_conversion(open_location(source, opts), recipe)


def refuse_overlap_early(source: str, dest: str, work: str | None, opts: dict[str, Any],
                         dask_address: str | None = None) -> None:
    """SOURCE, DEST and the work location must not nest, and DEST and work must be writable: said
    in a second, before Prefect starts. The flows check again (deployment runs do not come through here)."""
    from ckptflow.storage.overlap import refuse_overlap
    from ckptflow.storage.remote import check_writable_dest
    from ckptflow.storage.urls import open_location

    from ckptflow.flows.workdir import check_work_reachable, default_work

    dst, work_loc = open_location(dest, opts), open_location(work or default_work(dest), opts)
    refuse_overlap(("SOURCE", open_location(source, opts)), ("DEST", dst), ("--work", work_loc))
    check_work_reachable(work_loc, dask_address)
    check_writable_dest(dst)  # also: a DEST that is a file, a read-only disk, a missing bucket
    check_writable_dest(work_loc)


def no_stage_chosen(args: argparse.Namespace) -> bool:
    """Says so when a convert or watch command line names no stage. The recipe checks it again;
    this costs no Prefect start-up."""
    if args.dequant or args.fix_dtypes or args.reindex or args.mp is not None or args.quantize:
        return False
    print("error: nothing to do; choose stages: --dequant, --fix-dtypes, --reindex, --quantize, --mp N",
          file=sys.stderr)
    return True


def cmd_convert(args: argparse.Namespace, runtime: Runtime) -> int:
    if no_stage_chosen(args):
        return EXIT_USER_ERROR
    summary = run_convert(args, runtime, args.source, args.dest, args.work)
    if summary.get("dry_run"):
        from ckptflow.flows.dry_run import print_dry_run

        print_dry_run(summary, text_out(args))
    else:
        print_summary(summary, text_out(args))
    if args.json:
        print_json(summary)
    return 0

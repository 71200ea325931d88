"""`ckptflow` — the command line: convert, watch, validate, verify, inspect, megatron, demo.

User errors (bad input, missing files, unconvertible tensors) end in `error: …` lines naming
the file or tensor and a non-zero exit, never a traceback; `--verbose` shows Prefect's logs.
"""
from __future__ import annotations

# ruff: noqa: E402
# (imports below the clock: it must start before them)
import time

# The CLI's own start, what `time:` counts from: /proc's process start would add whatever ran in
# the process before it exec'd us (`bash -c "sleep 3 && exec ckptflow …"` counted the sleep).
_STARTED = time.monotonic()

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from ckptflow.flows.cli_parser import build_parser, non_utf8_argument  # no Prefect, no torch
from ckptflow.flows.printable import printable
from ckptflow.flows.summary_text import human as _human
from ckptflow.flows.summary_text import print_summary

EXIT_USER_ERROR = 2
_WATCHDOG: Any = None  # the orphan watcher of this CLI process (ckptflow.flows.watchdog), kept alive


def _quiet_prefect(verbose: bool) -> None:
    # Must run before prefect is imported: settings are read at import time.
    level = os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # Flow and task runs send INFO to the API (the UI's Logs tab) whatever the terminal shows.
    # Prefect re-reads its logging config more than once (and in each worker process), so this
    # goes through its environment overrides.
    for logger in ("FLOW_RUNS", "TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL",
                              "DEBUG" if level.upper() == "DEBUG" else "INFO")
    if not verbose:
        # Prefect logs a failing run's traceback; for user errors our one-line message is the
        # report, and warnings reach the user through the summary: the console drops run records.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS",
                              "ckptflow.flows.console_log.QuietRunsConsoleHandler")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Prefect's telemetry notice would print between the progress bars; a user's own choice stands.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The embedded server's telemetry needs the internet; without it, it logs an error at exit.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME runs database migrations first; on a small, busy machine the
    # temporary server can need more than Prefect's default 20 s to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def convert_options(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The `ConvertOptions` fields from a command line (`_add_convert_options` makes a flag of each);
    a command without those flags (`demo`) gets the defaults, and `fixed` on top."""
    from ckptflow.flows.params import ConvertOptions

    return {**{field: getattr(args, field, info.default) for field, info in ConvertOptions.model_fields.items()},
            **fixed}


def _run_convert(args: argparse.Namespace, source: str, dest: str, work: str | None,
                 **fixed: Any) -> dict[str, Any]:
    from ckptflow.storage.urls import parse_storage_options

    from ckptflow.flows.params import ConvertOptions

    opts = parse_storage_options(getattr(args, "storage_options", None))
    # bad values fail here, one line each, before torch or Prefect load
    validated = ConvertOptions(**convert_options(args, **fixed))
    options = validated.model_dump()
    refuse_overlap_early(source, dest, work, opts, validated.dask_address)
    planned = plan_early(source, validated.recipe(), opts)
    if getattr(args, "dry_run", False):
        from ckptflow.flows.dry_run import dry_run_report

        from ckptflow.flows.workdir import default_work

        return dry_run_report(planned, source, dest, work or default_work(dest))
    from ckptflow.flows import server

    server.prestart()  # boots while torch and Prefect import below
    from ckptflow.tasks.run import progress

    from ckptflow.flows.bars import open_bars
    from ckptflow.flows.convert import convert_flow
    from ckptflow.flows.run_link import linked
    from ckptflow.flows.runners import make_task_runner

    progress.attach(*open_bars(planned.total_bytes, planned.total_shards))  # totals from the first frame
    from ckptflow.flows.summary_text import timing

    try:
        called = time.monotonic() - args.started  # from here on the wait is Prefect's: server, flow run
        server.ready()  # before the runner: local workers share this same temporary server
        runner = make_task_runner(options["task_runner"], options["max_workers"], options["dask_address"])
        summary = linked(convert_flow.with_options(task_runner=runner))(
            source=source, dest=dest, work=work, storage_options=opts or None, **options)
        summary["timing"] = timing(summary, called, time.monotonic() - args.started, server.label())
        from ckptflow.flows.user_dirs import note

        if note():  # no HOME: where Prefect's records went
            summary["notes"] = [*summary.get("notes", []), note()]
        return summary
    finally:
        progress.detach()


def plan_early(source: str, recipe: Any, opts: dict[str, Any]) -> Any:
    """Headers read, validated and every pass planned before Prefect (or torch) is imported: an
    input error is one `error:` line in about a second. The flow reuses this plan (same process,
    same files) and plans itself when run any other way. A `--fetch` of a remote SOURCE plans on
    the remote headers here (range reads); the flow plans again on the fetched copy."""
    from ckptflow.storage.urls import open_location

    from ckptflow.flows.preflight import plan_conversion, remember

    src = open_location(source, opts)
    planned = plan_conversion(src, recipe)
    remember(src, planned)
    return planned


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


def _no_stage_chosen(args: argparse.Namespace) -> bool:
    """Says so when a convert or watch command line names no stage. The recipe checks it again;
    this costs no Prefect start-up."""
    if args.dequant or args.fix_dtypes or args.reindex or args.mp is not None or args.quantize:
        return False
    print("error: nothing to do; choose stages: --dequant, --fix-dtypes, --reindex, --quantize, --mp N",
          file=sys.stderr)
    return True


def _text_out(args: argparse.Namespace) -> Any:
    """Where the human text goes: with --json, stdout holds the one JSON document (`| jq` reads
    it whole), so the text a person reads goes to stderr."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def _print_json(summary: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))


def cmd_convert(args: argparse.Namespace) -> int:
    if _no_stage_chosen(args):
        return EXIT_USER_ERROR
    summary = _run_convert(args, args.source, args.dest, args.work)
    if summary.get("dry_run"):
        from ckptflow.flows.dry_run import print_dry_run

        print_dry_run(summary, _text_out(args))
    else:
        print_summary(summary, _text_out(args))
    if args.json:
        _print_json(summary)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    if _no_stage_chosen(args):
        return EXIT_USER_ERROR
    from ckptflow.storage.urls import parse_storage_options

    from ckptflow.flows.params import ConvertOptions

    options = ConvertOptions(**convert_options(args))  # before torch and Prefect load
    from ckptflow.storage.overlap import open_watch_prefixes

    opts = parse_storage_options(args.storage_options) or None
    src, dst, work = open_watch_prefixes(args.source_prefix, args.dest_prefix, args.work_prefix,
                                         opts)  # overlap: before Prefect too
    if args.dry_run:  # listings and markers only: no Prefect, no server
        from ckptflow.flows.watch_scan import scan_watch, watch_summary

        warn = lambda text: print(f"warning: {text}", file=sys.stderr)  # noqa: E731
        scan = scan_watch(src, dst, work, options.recipe_key(), args.settle_seconds, warn)
        print_watch(watch_summary(args.source_prefix, args.dest_prefix, scan.plan, True, {}), args.json)
        return 0
    from ckptflow.flows import server

    server.prestart()  # boots while the flow imports; deaf to the terminal's Ctrl-C (flows/server.py)
    from ckptflow.flows.run_link import linked
    from ckptflow.flows.watch import WatchFailed, watch_flow

    server.ready()

    try:
        summary = linked(watch_flow)(source_prefix=args.source_prefix, dest_prefix=args.dest_prefix,
                                     options=options, work_prefix=args.work_prefix,
                                     max_concurrent=args.max_concurrent, settle_seconds=args.settle_seconds,
                                     storage_options=opts)
    except WatchFailed as exc:
        print_watch(exc.summary, args.json)  # what did convert is news too
        raise
    print_watch(summary, args.json)
    return 0


def print_watch(summary: dict[str, Any], as_json: bool) -> None:
    out = sys.stderr if as_json else sys.stdout
    for c in summary["checkpoints"]:
        r = c.get("result") or {}
        done = (" → failed" if "error" in r else
                f" → {r['shards']} shards ({r['cached_shards']} reused)" if r else "")
        print(f"{printable(c['name']):<24} {c['action']:<11} {printable(c['reason'])}{done}", file=out)
    if not summary["checkpoints"]:
        print(f"{printable(summary['source_prefix'])}: no checkpoints found (folders holding *.safetensors)",
              file=out)
    if as_json:
        print(json.dumps(summary))


def cmd_validate(args: argparse.Namespace) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location, parse_storage_options
    from ckptflow.tasks.validate import find_problems, mp_world

    ckpt = scan_checkpoint(open_location(args.source, parse_storage_options(args.storage_options)))
    problems = find_problems(ckpt, require_index=None)  # None: MP rank files need no index
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        print(f"{p.severity}: {p}", file=sys.stderr if p.severity == "error" else _text_out(args))
    n = sum(len(h.tensors) for h in ckpt.headers.values())
    world = mp_world(ckpt)
    layout = (f"{world} model-parallel rank files (no index, as ckptflow writes them)" if world
              else "index consistent" if ckpt.index is not None or len(ckpt.weight_files) > 1 else "one file")
    if args.json:
        print(json.dumps({"source": args.source, "ok": not errors, "files": len(ckpt.weight_files), "tensors": n,
                          "layout": None if errors else layout, "problems": [asdict(p) for p in problems]}))
    if errors:
        print(f"{args.source}: {len(errors)} problem(s) in {len(ckpt.weight_files)} file(s)", file=sys.stderr)
        return 1
    print(f"{args.source}: ok — {len(ckpt.weight_files)} file(s), {n} tensors, {layout}", file=_text_out(args))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location, parse_storage_options
    from ckptflow.tasks.planners.torch_dtype import check_dtypes
    from ckptflow.tasks.validate import find_problems
    from ckptflow.tasks.verify_quant import verify_quantization

    if args.fix_dtypes_dest:
        args.dequant, args.fix_dtypes, args.fetch = False, True, False
        summary = _run_convert(args, args.path, args.fix_dtypes_dest, args.work)
        print_summary(summary, _text_out(args))
        if args.json:
            _print_json(summary)
        return 0
    loc = open_location(args.path, parse_storage_options(args.storage_options))
    ckpt = scan_checkpoint(loc)
    errors = [p for p in find_problems(ckpt, require_index=None) if p.severity == "error"]
    for p in errors:
        print(f"error: {p}", file=sys.stderr)
    report = check_dtypes(ckpt, tuple(args.allow_dtype or ()))
    quant = verify_quantization(ckpt, loc, checkable=not errors)
    for line in quant.error_lines():
        print(f"error: {line}", file=sys.stderr)
    text = report.text()
    if errors or not quant.ok:  # never "all … match" above a failure
        text = text.replace("all floating tensors match the config",
                            "floating dtypes match the config, but the checkpoint has problems")
    print("\n".join(t for t in (text, quant.text()) if t), file=_text_out(args))
    if args.json:
        print(json.dumps({"path": args.path, "ok": report.ok and not errors and quant.ok,
                          "torch_dtype": report.expected, "dtypes": report.rows(),
                          "mismatches": [asdict(m) for m in report.mismatches],
                          "problems": [asdict(p) for p in errors], "quantization": quant.as_json()}))
    failures = len(errors) + quant.failures
    if failures or not report.ok:
        if not report.ok:
            print(f"\nfix: ckptflow verify {args.path} --fix-dtypes DEST", file=sys.stderr)
        if failures:  # the dtype table above may look clean: the verdict is this line
            print(f"{args.path}: FAILED — {failures} problem(s) besides dtypes (error lines above)",
                  file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptflow.flows.inspect import cmd_inspect as run
    from ckptflow.flows.megatron_core import inspect_megatron_core, is_megatron_core
    from ckptflow.storage.urls import parse_storage_options

    if is_megatron_core(args.source, parse_storage_options(args.storage_options) or None):
        return inspect_megatron_core(args, _human)
    return run(args, _human)


def cmd_megatron(args: argparse.Namespace) -> int:
    from ckptflow.storage.urls import parse_storage_options

    opts = parse_storage_options(args.storage_options) or None
    refuse_overlap_early(args.source, args.dest, args.work, opts or {})
    from ckptflow.flows.megatron_core import is_megatron_core, refuse_core_only_flags, run_megatron_core

    if is_megatron_core(args.source, opts):
        return run_megatron_core(args, _human, _text_out, _print_json)
    refuse_core_only_flags(args)
    from ckptflow.flows import server
    from ckptflow.flows.megatron import megatron_flow, megatron_preflight
    from ckptflow.flows.run_link import linked

    megatron_preflight(args.source, args.config, opts, args.table)  # bombs and bad shapes: before Prefect starts

    server.prestart()  # deaf to the terminal's Ctrl-C (flows/server.py)
    server.ready()
    summary = linked(megatron_flow)(source=args.source, dest=args.dest, tokenizer=args.tokenizer,
                                    config=args.config, table=args.table, max_shard_size=args.max_shard_size,
                                    work=args.work, storage_options=parse_storage_options(args.storage_options) or None)
    out = _text_out(args)
    print(f"output:   {summary['dest']}  (GPT2LMHeadModel, from TP={summary['tp']}, "
          f"checkpoint_version {summary['checkpoint_version']})", file=out)
    print(f"shards:   {summary['shards']}, tensors: {summary['tensors']}, bytes: {_human(summary['bytes_written'])}",
          file=out)
    print("dtypes:   " + ", ".join(f"{k}×{v}" for k, v in summary["dtypes"].items()), file=out)
    if args.json:
        _print_json(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptflow.storage.urls import open_location

    root = args.dest.rstrip("/")
    source, dest = f"{root}/source-fp8", f"{root}/output-bf16"
    src = open_location(source)
    if src.fs.exists(src.path("model.safetensors.index.json")):
        print(f"demo: reused the DeepSeek-V3-shaped FP8 checkpoint at {source}")
    else:
        from ckptflow.flows.synthetic import make_deepseek_v3_fp8  # torch: only to generate

        make_deepseek_v3_fp8(src)
        print(f"demo: generated a DeepSeek-V3-shaped FP8 checkpoint at {source}")
    summary = _run_convert(args, source, dest, f"{root}/.work", dequant=True)
    print_summary(summary)
    print(f"\nnext: ckptflow validate {dest}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from ckptflow.flows import local_server

    if args.action in ("start", "stop") and (stale := local_server.forget_stale()):
        print(f"note: {stale}")
    if args.action == "start":
        url = local_server.start(args.port)
        print(f"local Prefect server at {url} (UI: {url.removesuffix('/api')}); ckptflow runs without "
              f"PREFECT_API_URL use it until `ckptflow server stop`")
        return 0
    if args.action == "stop":
        print("local Prefect server stopped" if local_server.stop() else "no local Prefect server was running")
        return 0
    url, pid = local_server.status()
    if url is None:
        print(f"no local Prefect server running (start one: ckptflow server start; files: {local_server.home()})")
        return 1
    print(f"local Prefect server at {url}, pid {pid}, files in {local_server.home()}")
    return 0


def _is_parameter_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    from prefect.exceptions import ParameterTypeError

    return isinstance(exc, ParameterTypeError)


def _parameter_problems(exc: BaseException) -> str:
    """One `name: what is wrong` per bad value, from a pydantic or a Prefect parameter error."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        lines = [line.strip(" -") for line in str(exc).splitlines()[1:] if line.strip()]
        return "; ".join(lines) or str(exc)
    from ckptflow.flows.params import ConvertOptions, flag_of

    out = []
    for e in errors():
        field = ConvertOptions.model_fields.get(str(e["loc"][-1]))
        # a field of the options is named as the flag that sets it
        name = flag_of(str(e["loc"][-1]), field).name if field is not None else ".".join(map(str, e["loc"]))
        if e["type"] == "string_pattern_mismatch" and field is not None and field.description:
            what = field.description.split(": ", 1)[-1] if field.description.startswith("--") else field.description
            out.append(f"{name}: {e.get('input')!r} is not valid ({what})")
        else:
            out.append(f"{name}: {e['msg']}")
    return "; ".join(out)


HANDLERS = {"convert": cmd_convert, "watch": cmd_watch, "verify": cmd_verify, "megatron": cmd_megatron,
            "validate": cmd_validate, "inspect": cmd_inspect, "demo": cmd_demo, "server": cmd_server}

# Commands that start Prefect (and so a temporary server, maybe worker processes).
_STARTS_PREFECT = {"convert", "watch", "megatron", "demo", "verify"}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:  # a real CLI process: skip Prefect's slow teardown of its temporary server
        from ckptflow.flows import interrupt, user_dirs

        user_dirs.remove_temporary_prefect_home()

        return interrupt.leave(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `time:` counts from here on a call from Python, from this module's import in a CLI process
    args.started = _STARTED if argv is None else time.monotonic()
    if (problem := non_utf8_argument(parser, args)) is not None:  # before anything hashes or sends it
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    _quiet_prefect(args.verbose)
    from ckptflow.storage.errors import UserError
    from ckptflow.storage.faults import explain

    if args.command in _STARTS_PREFECT and argv is None:  # a real CLI process, not a test's call
        from ckptflow.flows import interrupt, user_dirs, watchdog

        user_dirs.fall_back_prefect_home()  # no HOME: Prefect, imported later, gets a temporary one

        global _WATCHDOG
        _WATCHDOG = watchdog.start()
        interrupt.arm()  # Ctrl-C / SIGTERM: one line, exit 130 / 143, within a second
    try:
        return HANDLERS[args.command](args)
    except UserError as exc:
        if args.verbose:
            raise
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if args.verbose:
            raise
        if _is_parameter_error(exc):
            print(f"error: invalid option: {_parameter_problems(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        line = explain(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # only where the handlers are not armed (main(argv) from Python)
        from ckptflow.flows.interrupt import message

        print(message(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

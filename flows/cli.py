"""`ckptflow` — the command line: convert, watch, validate, verify, inspect, megatron, demo.

User errors (bad input, missing files, unconvertible tensors) end in `error: …` lines naming
the file or tensor and a non-zero exit, never a traceback; `--verbose` shows Prefect's logs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ckptflow.flows.summary_text import human as _human  # stdlib only: no Prefect, no torch
from ckptflow.flows.summary_text import print_summary

EXIT_USER_ERROR = 2
_WATCHDOG: Any = None  # the orphan watcher of this CLI process (ckptflow.flows.watchdog), kept alive


def _quiet_prefect(verbose: bool) -> None:
    # Must run before prefect is imported: settings are read at import time.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    if not verbose:
        # Prefect logs a failing run's traceback; for user errors our one-line message is the
        # report, and warnings reach the user through the summary. Prefect re-reads its logging
        # config more than once, so this goes through its environment overrides.
        for logger in ("FLOW_RUNS", "TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL", "CRITICAL")
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
    refuse_overlap_early(source, dest, work, opts)
    planned = plan_early(source, validated.recipe(), opts)
    if getattr(args, "dry_run", False):
        from ckptflow.flows.dry_run import dry_run_report

        from ckptflow.flows.workdir import default_work

        return dry_run_report(planned, source, dest, work or default_work(dest))
    from ckptflow.flows import server

    server.prestart()  # boots while torch and Prefect import below
    from tqdm import tqdm

    from ckptflow.tasks.run import progress

    from ckptflow.flows.convert import convert_flow
    from ckptflow.flows.runners import make_task_runner

    progress.attach(tqdm(unit="B", unit_scale=True, desc="bytes ", disable=None, leave=False),
                    tqdm(unit="shard", desc="shards", disable=None, leave=False))
    from ckptflow.flows.summary_text import process_age, timing

    try:
        called = process_age()  # from here on the wait is Prefect's: its server, then the flow run
        server.ready()  # before the runner: local workers share this same temporary server
        runner = make_task_runner(options["task_runner"], options["max_workers"], options["dask_address"])
        summary = convert_flow.with_options(task_runner=runner)(
            source=source, dest=dest, work=work, storage_options=opts or None, **options)
        summary["timing"] = timing(summary, called, process_age(), server.label())
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


def refuse_overlap_early(source: str, dest: str, work: str | None, opts: dict[str, Any]) -> None:
    """SOURCE, DEST and the work location must not nest, and DEST and work must be writable: said
    in a second, before Prefect starts. The flows check again (deployment runs do not come through here)."""
    from ckptflow.storage.overlap import refuse_overlap
    from ckptflow.storage.remote import check_writable_dest
    from ckptflow.storage.urls import open_location

    from ckptflow.flows.workdir import default_work

    dst, work_loc = open_location(dest, opts), open_location(work or default_work(dest), opts)
    refuse_overlap(("SOURCE", open_location(source, opts)), ("DEST", dst), ("--work", work_loc))
    check_writable_dest(dst)  # also: a DEST that is a file, a read-only disk, a missing bucket
    check_writable_dest(work_loc)


def _no_stage_chosen(args: argparse.Namespace) -> bool:
    """Says so when a convert or watch command line names no stage. The recipe checks it again;
    this costs no Prefect start-up."""
    if args.dequant or args.fix_dtypes or args.reindex or args.mp is not None:
        return False
    print("error: nothing to do; choose stages: --dequant, --fix-dtypes, --reindex, --mp N", file=sys.stderr)
    return True


def cmd_convert(args: argparse.Namespace) -> int:
    if _no_stage_chosen(args):
        return EXIT_USER_ERROR
    summary = _run_convert(args, args.source, args.dest, args.work)
    if summary.get("dry_run"):
        from ckptflow.flows.dry_run import print_dry_run

        print_dry_run(summary)
        if args.json:
            print(json.dumps(summary))
        return 0
    print_summary(summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    if _no_stage_chosen(args):
        return EXIT_USER_ERROR
    from ckptflow.storage.urls import parse_storage_options

    from ckptflow.flows.params import ConvertOptions

    options = ConvertOptions(**convert_options(args))  # before torch and Prefect load
    from ckptflow.storage.overlap import open_watch_prefixes

    open_watch_prefixes(args.source_prefix, args.dest_prefix, args.work_prefix,
                        parse_storage_options(args.storage_options) or None)  # overlap: before Prefect too
    from ckptflow.flows import server

    server.prestart()  # boots while the flow imports; deaf to the terminal's Ctrl-C (flows/server.py)
    from ckptflow.flows.watch import WatchFailed, watch_flow

    server.ready()

    try:
        summary = watch_flow(source_prefix=args.source_prefix, dest_prefix=args.dest_prefix,
                             options=options, work_prefix=args.work_prefix,
                             max_concurrent=args.max_concurrent, settle_seconds=args.settle_seconds,
                             dry_run=args.dry_run,
                             storage_options=parse_storage_options(args.storage_options) or None)
    except WatchFailed as exc:
        print_watch(exc.summary, args.json)  # what did convert is news too
        raise
    print_watch(summary, args.json)
    if not summary["checkpoints"]:
        print(f"{args.source_prefix}: no checkpoints found (folders holding *.safetensors)")
    return 0


def print_watch(summary: dict[str, Any], as_json: bool) -> None:
    for c in summary["checkpoints"]:
        r = c.get("result") or {}
        done = (" → failed" if "error" in r else
                f" → {r['shards']} shards ({r['cached_shards']} reused)" if r else "")
        print(f"{c['name']:<24} {c['action']:<11} {c['reason']}{done}")
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
        print(f"{p.severity}: {p}", file=sys.stderr if p.severity == "error" else sys.stdout)
    n = sum(len(h.tensors) for h in ckpt.headers.values())
    if errors:
        print(f"{args.source}: {len(errors)} problem(s) in {len(ckpt.weight_files)} file(s)", file=sys.stderr)
        return 1
    world = mp_world(ckpt)
    layout = (f"{world} model-parallel rank files (no index, as ckptflow writes them)" if world
              else "index consistent" if ckpt.index is not None or len(ckpt.weight_files) > 1 else "one file")
    print(f"{args.source}: ok — {len(ckpt.weight_files)} file(s), {n} tensors, {layout}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location, parse_storage_options
    from ckptflow.tasks.planners.torch_dtype import check_dtypes
    from ckptflow.tasks.validate import find_problems

    if args.fix_dtypes_dest:
        args.dequant, args.fix_dtypes, args.fetch = False, True, False
        summary = _run_convert(args, args.path, args.fix_dtypes_dest, args.work)
        print_summary(summary)
        return 0
    ckpt = scan_checkpoint(open_location(args.path, parse_storage_options(args.storage_options)))
    errors = [p for p in find_problems(ckpt, require_index=None) if p.severity == "error"]
    for p in errors:
        print(f"error: {p}", file=sys.stderr)
    report = check_dtypes(ckpt, tuple(args.allow_dtype or ()))
    text = report.text()
    if errors:  # never "all … match" above a failure
        text = text.replace("all floating tensors match the config",
                            "floating dtypes match the config, but the checkpoint has problems")
    print(text)
    if errors or not report.ok:
        if not report.ok:
            print(f"\nfix: ckptflow verify {args.path} --fix-dtypes DEST", file=sys.stderr)
        if errors:  # the dtype table above may look clean: the verdict is this line
            print(f"{args.path}: FAILED — {len(errors)} problem(s) besides dtypes (error lines above)",
                  file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptflow.flows.inspect import cmd_inspect as run

    return run(args, _human)


def cmd_megatron(args: argparse.Namespace) -> int:
    from ckptflow.storage.urls import parse_storage_options

    opts = parse_storage_options(args.storage_options) or None
    refuse_overlap_early(args.source, args.dest, args.work, opts or {})
    from ckptflow.flows import server
    from ckptflow.flows.megatron import megatron_flow, megatron_preflight

    megatron_preflight(args.source, args.config, opts, args.table)  # bombs and bad shapes: before Prefect starts

    server.prestart()  # deaf to the terminal's Ctrl-C (flows/server.py)
    server.ready()
    summary = megatron_flow(source=args.source, dest=args.dest, tokenizer=args.tokenizer, config=args.config,
                            table=args.table, max_shard_size=args.max_shard_size, work=args.work,
                            storage_options=parse_storage_options(args.storage_options) or None)
    print(f"output:   {summary['dest']}  (GPT2LMHeadModel, from TP={summary['tp']}, "
          f"checkpoint_version {summary['checkpoint_version']})")
    print(f"shards:   {summary['shards']}, tensors: {summary['tensors']}, bytes: {_human(summary['bytes_written'])}")
    print("dtypes:   " + ", ".join(f"{k}×{v}" for k, v in summary["dtypes"].items()))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
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


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_convert_options(c: argparse.ArgumentParser) -> None:
    """One flag per field of `ckptflow.flows.params.ConvertOptions`, with its help, choices and default.

    Values are checked by the model itself (`ConvertOptions(**convert_options(args))`), so a flag and
    a flow parameter accept exactly the same things."""
    import typing

    from ckptflow.flows.params import ConvertOptions, flag_of

    for name, info in ConvertOptions.model_fields.items():
        flag = flag_of(name, info)
        kwargs: dict[str, Any] = {"dest": name, "default": info.default, "help": info.description}
        if info.annotation is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = flag.metavar
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal \
                else None
            if choices:
                kwargs.update(choices=choices, metavar=None)
            if flag.repeat:
                kwargs["action"] = "append"
        if info.default not in (None, False):
            kwargs["help"] += f" (default {info.default})"
        c.add_argument(flag.name, **kwargs)
    c.add_argument("--storage-options", help="JSON of fsspec storage options for SOURCE and DEST")


def _add_convert_extras(c: argparse.ArgumentParser) -> None:
    """convert-only flags that are not `ConvertOptions` fields (they change what the CLI does, not
    what the flow converts)."""
    c.add_argument("--dry-run", action="store_true",
                   help="read headers and plan every pass, print files, bytes and what happens to each "
                        "tensor; write nothing and start no Prefect (with --json: as JSON)")


def version() -> str:
    """The installed distribution's version: pyproject.toml is the one place it is written."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ckptflow")
    except PackageNotFoundError:  # imported from a bare checkout on sys.path, not installed
        return "0+unknown"


def _add_verbose(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show Prefect's logs and tracebacks")


def _command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand; it takes `-v/--verbose` too (`ckptflow convert A B --dequant -v`). The default
    there is SUPPRESS, so a `-v` given before the subcommand is not reset to False by the subparser."""
    parser = sub.add_parser(name, **kwargs)
    _add_verbose(parser, argparse.SUPPRESS)
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptflow", description="Convert large LLM checkpoints, resumably.")
    _add_verbose(p, False)
    p.add_argument("--version", action="version", version=f"ckptflow {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    c = _command(sub, "convert", help="convert SOURCE into DEST (any fsspec URLs)")
    c.add_argument("source")
    c.add_argument("dest")
    c.add_argument("--work", help="work location: shard records and fetched files "
                                  "(default: ~/.cache/ckptflow/work/<hash of DEST>)")
    _add_convert_options(c)
    c.add_argument("--json", action="store_true", help="also print the summary as JSON")
    _add_convert_extras(c)
    c.set_defaults(func=cmd_convert)

    w = _command(sub, "watch", help="convert every checkpoint under SOURCE_PREFIX whose output under "
                                     "DEST_PREFIX is missing or stale (what a schedule runs)")
    w.add_argument("source_prefix",
                   help="e.g. s3://models/incoming: each folder holding *.safetensors is one checkpoint")
    w.add_argument("dest_prefix", help="each checkpoint NAME is converted into DEST_PREFIX/NAME")
    w.add_argument("--work-prefix", help="shard records and markers, per checkpoint "
                                         "(default: DEST_PREFIX/.ckptflow-work)")
    w.add_argument("--max-concurrent", type=_at_least_one, default=2, help="conversions at once (default 2)")
    w.add_argument("--settle-seconds", type=_not_negative, default=600,
                   help="skip a checkpoint a file of which changed more recently than this "
                        "(still uploading; default 600)")
    w.add_argument("--dry-run", action="store_true", help="list what would be converted, and why; convert nothing")
    _add_convert_options(w)
    w.add_argument("--json", action="store_true", help="also print the summary as JSON")
    w.set_defaults(func=cmd_watch)

    f = _command(sub, "verify", help="check dtypes against config.json, index and total_size")
    f.add_argument("path", help="checkpoint folder or URL (index + shards, one file, or MP rank files)")
    f.add_argument("--fix-dtypes", dest="fix_dtypes_dest", metavar="DEST",
                   help="write a copy to DEST with mismatched tensors cast to the config's dtype")
    f.add_argument("--allow-dtype", action="append", metavar="REGEX",
                   help="tensor names allowed to differ from torch_dtype (repeatable)")
    f.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for PATH and DEST")
    f.add_argument("--work", help="--fix-dtypes: work location for shard records "
                                  "(default: ~/.cache/ckptflow/work/<hash of DEST>)")
    f.add_argument("--max-workers", type=int, default=1, help="--fix-dtypes: shard tasks at once (default 1)")
    f.set_defaults(func=cmd_verify, fix_dtypes=False)

    m = _command(sub, "megatron", help="convert a Megatron-LM GPT-2 checkpoint to Hugging Face GPT-2")
    m.add_argument("source", help=".pt file, Megatron checkpoint directory or NVIDIA .zip (any fsspec URL)")
    m.add_argument("dest", help="output folder or URL for the Hugging Face GPT-2 checkpoint")
    m.add_argument("--tokenizer", metavar="PATH", help="copy tokenizer files from here (no hub download)")
    m.add_argument("--config", metavar="FILE", help="config.json values that override the checkpoint's args "
                                                    "(e.g. {\"vocab_size\": 50257})")
    m.add_argument("--table", metavar="FILE|URL", help="Megatron → GPT-2 name table, JSON in the built-in "
                                                      "table's format (default: built in)")
    m.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    m.add_argument("--work", help="work location: the imported state and shard records "
                                  "(default: ~/.cache/ckptflow/work/<hash of DEST>)")
    m.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for SOURCE and DEST")
    m.add_argument("--json", action="store_true", help="also print the summary as JSON")
    m.set_defaults(func=cmd_megatron)

    v = _command(sub, "validate", help="check the index against every shard header")
    v.add_argument("source", help="checkpoint folder or URL (index + shards, one file, or MP rank files)")
    v.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for SOURCE")
    v.set_defaults(func=cmd_validate)

    i = _command(sub, "inspect", help="detected quantization schemes and what --dequant would write (headers only)")
    i.add_argument("source")
    i.add_argument("--storage-options")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = _command(sub, "demo", help="generate a small DeepSeek-V3 FP8 checkpoint and convert it")
    d.add_argument("dest", nargs="?", default="ckptflow-demo",
                   help="folder for the generated source-fp8/ and the converted output-bf16/ "
                        "(default ./ckptflow-demo; a second run reuses the source)")
    d.add_argument("--max-workers", type=int, default=1, help="shard tasks at once (default 1)")
    d.set_defaults(func=cmd_demo)

    s = _command(sub, "server", help="keep a local Prefect server running between runs (no start-up per run)")
    s.add_argument("action", choices=("start", "stop", "status"),
                   help="start: run one in the background (UI included), used by every later run without "
                        "PREFECT_API_URL; stop: stop it; status: is it running (exit 1 if not)")
    s.add_argument("--port", type=_at_least_one, help="start: its port on 127.0.0.1 (default: a free one)")
    s.set_defaults(func=cmd_server)
    return p


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


# Commands that start Prefect (and so a temporary server, maybe worker processes).
_STARTS_PREFECT = {"convert", "watch", "megatron", "demo", "verify"}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:  # a real CLI process: skip Prefect's slow teardown of its temporary server
        from ckptflow.flows import interrupt

        return interrupt.leave(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_prefect(args.verbose)
    from ckptflow.storage.errors import UserError
    from ckptflow.storage.faults import explain

    if args.command in _STARTS_PREFECT and argv is None:  # a real CLI process, not a test's call
        from ckptflow.flows import interrupt, watchdog

        global _WATCHDOG
        _WATCHDOG = watchdog.start()
        interrupt.arm()  # Ctrl-C / SIGTERM: one line, exit 130 / 143, within a second
    try:
        return args.func(args)
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

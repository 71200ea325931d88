"""The `ckptflow` command line's grammar: every subcommand, flag and help text, and nothing it runs
(flows/cli/ maps each subcommand to its handler). Nothing here imports Prefect or torch: `--help`,
`--version` and a bad flag answer at once."""
from __future__ import annotations

import argparse
from typing import Any

JSON_HELP = "print the summary as one JSON document on stdout (the text goes to stderr)"


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
            # an optional choice (`Literal[…] | None`) offers the Literal's values
            lit = next((a for a in (info.annotation, *typing.get_args(info.annotation))
                        if typing.get_origin(a) is typing.Literal), None)
            choices = typing.get_args(lit) if lit is not None else None
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


def _add_inspect_quantize(i: argparse.ArgumentParser) -> None:
    """`inspect --quantize SCHEME [--ignore PATTERN …]`: the choices are ConvertOptions' own."""
    import typing

    from ckptflow.flows.params import QuantizeScheme

    i.add_argument("--quantize", choices=typing.get_args(QuantizeScheme), metavar="SCHEME",
                   help="also show what `convert --quantize SCHEME` would write: format, config group, "
                        "tensors quantized, what stays unquantized and why, shared global scales, "
                        "shapes refused (SCHEME: %(choices)s)")
    i.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="--quantize: also leave these modules unquantized (name, glob or re:REGEX; repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptflow", description="Convert large LLM checkpoints, resumably.")
    _add_verbose(p, False)
    p.add_argument("--version", action="version", version=f"ckptflow {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    c = _command(sub, "convert", help="convert SOURCE into DEST (any fsspec URLs)")
    c.add_argument("source", help="checkpoint folder or URL (index + shards, or one file)")
    c.add_argument("dest", help="output folder or URL (written atomically, shard by shard)")
    c.add_argument("--work", help="work location: shard records and fetched files "
                                  "(default: ~/.cache/ckptflow/work/<hash of DEST>)")
    _add_convert_options(c)
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    _add_convert_extras(c)

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
    w.add_argument("--json", action="store_true", help=JSON_HELP)

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
    f.add_argument("--json", action="store_true", help=JSON_HELP)
    f.set_defaults(fix_dtypes=False)

    m = _command(sub, "megatron", help="convert a Megatron-Core (torch_dist, mp_rank_*) or Megatron-LM GPT-2 "
                                        "checkpoint to Hugging Face")
    m.add_argument("source", help=".pt file, Megatron checkpoint directory or NVIDIA .zip (any fsspec URL)")
    m.add_argument("dest", help="output folder or URL for the Hugging Face GPT-2 checkpoint")
    m.add_argument("--tokenizer", metavar="PATH", help="copy tokenizer files from here (no hub download)")
    m.add_argument("--config", metavar="FILE", help="config.json values that override the checkpoint's args "
                                                    "(e.g. {\"vocab_size\": 50257})")
    m.add_argument("--table", metavar="FILE|URL", help="Megatron → GPT-2 name table, JSON in the built-in "
                                                      "table's format (default: built in)")
    m.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    m.add_argument("--family", help="Megatron-Core model family (llama, qwen2, qwen3, mixtral, qwen3_moe, "
                                    "qwen2_moe, deepseek_v3; default: from the saved args)")
    m.add_argument("--dry-run", action="store_true", help="Megatron-Core: print the plan, write nothing")
    m.add_argument("--work", help="work location: the imported state and shard records "
                                  "(default: ~/.cache/ckptflow/work/<hash of DEST>)")
    m.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for SOURCE and DEST")
    m.add_argument("--json", action="store_true", help=JSON_HELP)

    v = _command(sub, "validate", help="check the index against every shard header")
    v.add_argument("source", help="checkpoint folder or URL (index + shards, one file, or MP rank files)")
    v.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for SOURCE")
    v.add_argument("--json", action="store_true", help=JSON_HELP)

    i = _command(sub, "inspect", help="detected quantization schemes and what --dequant would write (headers only)")
    i.add_argument("source", help="checkpoint folder or URL")
    i.add_argument("--storage-options", metavar="JSON", help="JSON of fsspec storage options for SOURCE")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_inspect_quantize(i)

    d = _command(sub, "demo", help="generate a small DeepSeek-V3 FP8 checkpoint and convert it")
    d.add_argument("dest", nargs="?", default="ckptflow-demo",
                   help="folder for the generated source-fp8/ and the converted output-bf16/ "
                        "(default ./ckptflow-demo; a second run reuses the source)")
    d.add_argument("--max-workers", type=int, default=1, help="shard tasks at once (default 1)")

    s = _command(sub, "server", help="keep a local Prefect server running between runs (no start-up per run)")
    s.add_argument("action", choices=("start", "stop", "status"),
                   help="start: run one in the background (UI included), used by every later run without "
                        "PREFECT_API_URL; stop: stop it; status: is it running (exit 1 if not)")
    s.add_argument("--port", type=_at_least_one, help="start: its port on 127.0.0.1 (default: a free one)")
    return p


# Arguments that name files or locations: a non-UTF-8 one is a path to rename.
_PATHS = {"source", "dest", "path", "work", "source_prefix", "dest_prefix", "work_prefix", "tokenizer", "config",
          "table", "fix_dtypes_dest", "fused_groups", "preset"}


def _labels(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """How the user typed each argument of `command`: SOURCE for a positional, its flag for an option."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: max(a.option_strings, key=len) if a.option_strings else a.dest.upper()
            for a in subs.choices[command]._actions}


def non_utf8_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The problem with the first argument that is not valid UTF-8, or None.

    Python hands such bytes over as lone surrogates; let through, they fail deep inside (a hash,
    a URL, Prefect's JSON) as a UnicodeEncodeError traceback, after Prefect has started."""
    from ckptflow.flows.printable import printable

    labels = _labels(parser, args.command)
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                label = labels.get(dest, dest)
                if dest in _PATHS:
                    return f"{label} path is not valid UTF-8: '{printable(v)}'; rename it"
                return f"{label} is not valid UTF-8: '{printable(v)}'; type it in UTF-8"
    return None

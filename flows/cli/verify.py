"""`ckptflow verify`: dtypes against config.json (and `--fix-dtypes DEST`, a convert)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ckptflow.flows.cli.convert import run_convert
from ckptflow.flows.runtime.process import Runtime
from ckptflow.flows.cli.output import print_json, text_out
from ckptflow.flows.summary_text import print_summary


def cmd_verify(args: argparse.Namespace, runtime: Runtime) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location, parse_storage_options
    from ckptflow.tasks.planners.torch_dtype import check_dtypes
    from ckptflow.tasks.validate import find_problems
    from ckptflow.tasks.verify_quant import verify_quantization

    if args.fix_dtypes_dest:
        args.dequant, args.fix_dtypes, args.fetch = False, True, False
        summary = run_convert(args, runtime, args.path, args.fix_dtypes_dest, args.work)
        print_summary(summary, text_out(args))
        if args.json:
            print_json(summary)
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
    print("\n".join(t for t in (text, quant.text()) if t), file=text_out(args))
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

"""`ckptflow validate`: the index against every shard header."""
from __future__ import annotations

import argparse
from typing import Any
import json
import sys
from dataclasses import asdict

from ckptflow.flows.cli.output import text_out


def cmd_validate(args: argparse.Namespace, runtime: Any = None) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location, parse_storage_options
    from ckptflow.tasks.validate import find_problems, mp_world

    ckpt = scan_checkpoint(open_location(args.source, parse_storage_options(args.storage_options)))
    problems = find_problems(ckpt, require_index=None)  # None: MP rank files need no index
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        print(f"{p.severity}: {p}", file=sys.stderr if p.severity == "error" else text_out(args))
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
    print(f"{args.source}: ok — {len(ckpt.weight_files)} file(s), {n} tensors, {layout}", file=text_out(args))
    return 0

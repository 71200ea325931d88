"""`ckptflow demo`: generate a small DeepSeek-V3-shaped FP8 checkpoint and convert it."""
from __future__ import annotations

import argparse

from ckptflow.flows.cli.convert import run_convert
from ckptflow.flows.runtime.process import Runtime
from ckptflow.flows.summary_text import print_summary


def cmd_demo(args: argparse.Namespace, runtime: Runtime) -> int:
    from ckptflow.storage.urls import open_location

    root = args.dest.rstrip("/")
    source, dest = f"{root}/source-fp8", f"{root}/output-bf16"
    src = open_location(source)
    if src.fs.exists(src.path("model.safetensors.index.json")):
        print(f"demo: reused the DeepSeek-V3-shaped FP8 checkpoint at {source}")
    else:
        from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8  # torch: only to generate

        make_deepseek_v3_fp8(src)
        print(f"demo: generated a DeepSeek-V3-shaped FP8 checkpoint at {source}")
    summary = run_convert(args, runtime, source, dest, f"{root}/.work", dequant=True)
    print_summary(summary)
    print(f"\nnext: ckptflow validate {dest}")
    return 0

"""--quantize against llm-compressor's model_free_ptq on the same real-shape shard: GB/s and peak RSS.

    python bench/bench_quantize.py [--layers 2] [--scheme nvfp4|fp8-block|fp8-channel] [--dir /tmp/qbench]

Builds one BF16 shard of Llama-3-8B-shaped layers (hidden 4096, intermediate 14336, 8 KV heads;
about 0.44 GB per layer), then converts it with ckptflow's engine (no Prefect: the server's
memory is not the stage's) and with model_free_ptq on the CPU from its own virtualenv
(CKPTFLOW_LLMC_PYTHON, default /work/venvs/llmc/bin/python), each in a child process; prints
wall time, input GB/s, peak RSS and the ratio. `run` is the child's entry point.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from common import mib, run_measured

PRESET = {"nvfp4": "NVFP4A16", "fp8-block": "FP8_BLOCK", "fp8-channel": "FP8_DYNAMIC"}
LLMC = os.environ.get("CKPTFLOW_LLMC_PYTHON", "/work/venvs/llmc/bin/python")
RUN_LLMC = ("import sys, json; from llmcompressor import model_free_ptq; model_free_ptq(model_stub=sys.argv[1], "
            "save_directory=sys.argv[2], scheme=sys.argv[3], ignore=json.loads(sys.argv[4]), max_workers=1, "
            "device='cpu'); print(HWM())")
# each child prints its own peak (VmHWM): wait4's ru_maxrss would carry this parent's resident set
# (the generated checkpoint) into the child across fork + exec (see measured_cli.py)
HWM = ("(lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) * 1024)")
RUN_LLMC = RUN_LLMC.replace("HWM()", HWM + "()")


def hwm() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def make(path: Path, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors").exists():
        return (path / "model.safetensors").stat().st_size
    path.mkdir(parents=True, exist_ok=True)
    h, inter, kv = 4096, 14336, 1024
    g = torch.Generator().manual_seed(0)
    t = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            t[p + name + ".weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                  "architectures": ["LlamaForCausalLM"]}))
    return (path / "model.safetensors").stat().st_size


def run(src: str, dst: str, work: str, scheme: str) -> None:
    from ckptflow.flows.params import Recipe
    from ckptflow.flows.preflight import Preflight
    from ckptflow.flows.recipe import plan_passes
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.run.engine import run_conversion

    recipe = Recipe(quantize=scheme, rounding="llmcompressor-cpu")
    loc = open_location(src)
    ckpt = scan_checkpoint(loc)
    passes, _ = plan_passes(ckpt, recipe)
    run_conversion(ckpt, Preflight(ckpt, recipe, passes).engine_passes(), loc, open_location(dst), work)
    print(hwm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scheme", default="nvfp4", choices=list(PRESET))
    ap.add_argument("--dir", default="/tmp/qbench")
    a = ap.parse_args()
    root = Path(a.dir)
    size = make(root / f"src-{a.layers}", a.layers)
    for d in ("ours", "work", "llmc"):
        shutil.rmtree(root / d, ignore_errors=True)
    ours_s, _, ours_out = run_measured([sys.executable, __file__, "run", str(root / f"src-{a.layers}"),
                                        str(root / "ours"), str(root / "work"), a.scheme])
    theirs_s, _, theirs_out = run_measured([LLMC, "-c", RUN_LLMC, str(root / f"src-{a.layers}"), str(root / "llmc"),
                                            PRESET[a.scheme], json.dumps(["lm_head"])])
    ours_rss, theirs_rss = int(ours_out.split()[-1]), int(theirs_out.split()[-1])
    print(f"input {size / 1e9:.2f} GB, {a.scheme}")
    print(f"ckptflow       {ours_s:6.1f} s  {size / ours_s / 1e9:.3f} GB/s  peak RSS {mib(ours_rss)}")
    print(f"model_free_ptq {theirs_s:6.1f} s  {size / theirs_s / 1e9:.3f} GB/s  peak RSS {mib(theirs_rss)}")
    print(f"speed ratio {theirs_s / ours_s:.2f}x, RSS ratio {theirs_rss / ours_rss:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run(*sys.argv[2:6])
    else:
        main()

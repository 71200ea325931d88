"""CPU weight-quantizer throughput (tasks/kernels/quant_fp8.py, quant_fp4.py) on one weight.

GB/s = bytes of the input weight (bf16 by default) per second, the median of --repeat runs, for
each scheme and rounding, with the amax pre-pass the stage runs (tensor_amax / block_amax)
timed on its own. Optionally the same quantization through compressed-tensors' own functions
as llm-compressor calls them (--llmc, needs llmcompressor importable), for the ratio.

    python bench/bench_quant_kernels.py [--rows 4096 --cols 4096 --dtype bfloat16 --repeat 5 --llmc]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptflow.tasks.kernels.quant_common import block_amax, tensor_amax  # noqa: E402
from ckptflow.tasks.kernels.quant_fp4 import mxfp4_quantize, nvfp4_global_scale, nvfp4_quantize  # noqa: E402
from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize, fp8_channel_quantize  # noqa: E402


def median_s(fn, repeat: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all threads: on a shared, loaded machine the
    CPU time is the steadier figure)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def llmc_cases(w: torch.Tensor) -> dict[str, object]:
    from tests.llmc_reference import quantize

    name = "model.layers.0.mlp.down_proj.weight"
    return {f"llm-compressor {scheme}": (lambda s=scheme: quantize({name: w}, s))
            for scheme in ("FP8_BLOCK", "FP8_DYNAMIC", "NVFP4A16", "MXFP4A16")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--llmc", action="store_true")
    args = ap.parse_args()
    w = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(
        getattr(torch, args.dtype))
    gs = nvfp4_global_scale(tensor_amax(w))
    cases: dict[str, object] = {
        "tensor_amax": lambda: tensor_amax(w),
        "block_amax": lambda: block_amax(w),
    }
    for r in ("fp32", "llmcompressor-cpu"):
        cases[f"fp8_block {r}"] = lambda r=r: fp8_block_quantize(w, r)
        cases[f"fp8_channel {r}"] = lambda r=r: fp8_channel_quantize(w, r)
        cases[f"nvfp4 {r}"] = lambda r=r: nvfp4_quantize(w, gs, r)
        cases[f"mxfp4 {r}"] = lambda r=r: mxfp4_quantize(w, r)
    if args.llmc:
        cases.update(llmc_cases(w))
    nbytes = w.numel() * w.element_size()
    print(f"{args.rows}x{args.cols} {args.dtype} ({nbytes / 2**20:.0f} MiB), torch threads {torch.get_num_threads()}")
    for label, fn in cases.items():
        wall, cpu = median_s(fn, args.repeat)
        print(f"  {label:32s} {wall * 1e3:8.1f} ms wall {nbytes / wall / 1e9:6.2f} GB/s   "
              f"{cpu * 1e3:8.1f} ms cpu {nbytes / cpu / 1e9:6.2f} GB/s per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU dequant throughput: the table path vs seed-000-style naive dequant, same run, same data.

Naive = the scale `repeat_interleave`d over the whole tensor, float32 multiply, cast to bf16.
Shapes are DeepSeek-V3's FP8 matrices; the two paths run interleaved (naive, table, naive, …)
so both see the same machine, and the median of each is kept. The headline ratio weights each
shape by how often it occurs in a DeepSeek-V3 MoE layer (257 experts × gate/up/down dominate),
i.e. what a real conversion spends. Issue 3 target: ≥ 5×.

    python bench/bench_cpu_dequant.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptflow.tasks.kernels.fp8_cpu import torch_weight_dequant  # noqa: E402

# (rows, cols, occurrences per DeepSeek-V3 MoE layer)
SHAPES = [(2048, 7168, 514), (7168, 2048, 257), (1536, 7168, 1), (24576, 1536, 1), (576, 7168, 1),
          (32768, 512, 1), (7168, 16384, 1)]


def naive(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = w.shape
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'shape':>12}{'per layer':>10}{'naive GB/s':>12}{'table GB/s':>12}{'ratio':>8}  identical")
    layer_naive = layer_table = layer_bytes = 0.0
    for rows, cols, count in SHAPES:
        w = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3
        same = torch.equal(naive(w, s).view(torch.int16), torch_weight_dequant(w, s).view(torch.int16))
        if not same:
            raise SystemExit(f"{rows}x{cols}: table path differs from the reference")
        t_naive, t_table = [], []
        for _ in range(args.repeat):  # interleaved: both see the same moments of a noisy machine
            t_naive.append(timed(lambda: naive(w, s)))
            t_table.append(timed(lambda: torch_weight_dequant(w, s)))
        tn, tt = statistics.median(t_naive), statistics.median(t_table)
        n = rows * cols
        layer_naive += count * tn
        layer_table += count * tt
        layer_bytes += count * n
        print(f"{f'{rows}x{cols}':>12}{count:>10}{n / tn / 1e9:12.3f}{n / tt / 1e9:12.3f}{tn / tt:8.2f}  {same}")
    print(f"{'MoE layer':>12}{'':>10}{layer_bytes / layer_naive / 1e9:12.3f}{layer_bytes / layer_table / 1e9:12.3f}"
          f"{layer_naive / layer_table:8.2f}   (weighted by occurrences; target ≥ 5×)")


if __name__ == "__main__":
    main()

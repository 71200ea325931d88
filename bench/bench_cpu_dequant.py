"""CPU dequant throughput: the table path vs seed-000-style naive dequant, same run, same data.

Naive = the scale `repeat_interleave`d over the whole tensor, float32 multiply, cast to bf16.
Reports GB/s of FP8 in for both on DeepSeek-V3-like shapes and the ratio (issue 3 target ≥ 5×).

    python bench/bench_cpu_dequant.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.fp8 import torch_weight_dequant  # noqa: E402

SHAPES = [(7168, 2048), (2048, 7168), (4096, 7168), (1536, 7168), (576, 7168), (24576, 1536)]


def naive(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = w.shape
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    total_naive = total_fast = total_bytes = 0.0
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'shape':>14}{'naive GB/s':>12}{'table GB/s':>12}{'ratio':>8}  identical")
    for rows, cols in SHAPES:
        w = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3
        t_naive = best_of(lambda: naive(w, s), args.repeat)
        t_fast = best_of(lambda: torch_weight_dequant(w, s), args.repeat)
        same = torch.equal(naive(w, s).view(torch.int16), torch_weight_dequant(w, s).view(torch.int16))
        n = rows * cols
        total_naive += t_naive
        total_fast += t_fast
        total_bytes += n
        print(f"{f'{rows}x{cols}':>14}{n / t_naive / 1e9:12.3f}{n / t_fast / 1e9:12.3f}"
              f"{t_naive / t_fast:8.2f}  {same}")
        if not same:
            raise SystemExit("table path differs from the reference")
    print(f"{'all':>14}{total_bytes / total_naive / 1e9:12.3f}{total_bytes / total_fast / 1e9:12.3f}"
          f"{total_naive / total_fast:8.2f}   (target ≥ 5×)")


if __name__ == "__main__":
    main()

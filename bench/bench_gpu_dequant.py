"""GPU dequant bandwidth: the Triton kernel's achieved bytes/s as a fraction of the device peak.

Bytes moved per element: 1 (FP8 in) + 2 (BF16 out) + scales. Peak is read from the device
(memory clock × bus width × 2) or given with --peak-gbs. Target (issue 3): ≥ 85% of peak.
Also checks the kernel against the CPU table path bit for bit on one shape.

    python bench/bench_gpu_dequant.py [--peak-gbs 4800]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def device_peak_gbs() -> float | None:
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return clock_mhz * 1e6 * bus_bits / 8 * 2 / 1e9
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-gbs", type=float, help="device memory bandwidth in GB/s (default: ask NVML)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine")
    from ckptflow.tasks.kernels.dispatch import weight_dequant
    from ckptflow.tasks.kernels.fp8_cpu import torch_weight_dequant
    from ckptflow.tasks.kernels.fp8_triton import triton_weight_dequant

    peak = args.peak_gbs or device_peak_gbs()
    print(f"device: {torch.cuda.get_device_name()}  peak: {peak or 'unknown'} GB/s")
    g = torch.Generator().manual_seed(0)
    check = (torch.randn(1000, 7000, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(8, 55, generator=g)
    same = torch.equal(weight_dequant(check.cuda(), scale.cuda(), backend="triton").cpu().view(torch.int16),
                       torch_weight_dequant(check, scale).view(torch.int16))
    print(f"Triton on GPU == CPU table path: {same}")
    for rows, cols in [(7168, 18432), (18432, 7168), (16384, 16384), (256 * 2048, 7168 // 4)]:
        w = torch.randint(0, 0x7E, (rows, cols), dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
        s = torch.rand(-(-rows // 128), -(-cols // 128), device="cuda")
        for _ in range(3):
            triton_weight_dequant(w, s)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 20
        start.record()
        for _ in range(n):
            triton_weight_dequant(w, s)
        end.record()
        torch.cuda.synchronize()
        sec = start.elapsed_time(end) / 1e3 / n
        moved = rows * cols * 3 + s.numel() * 4
        gbs = moved / sec / 1e9
        frac = f"{gbs / peak:.1%} of peak" if peak else ""
        print(f"{rows}x{cols}: {sec * 1e3:.3f} ms  {gbs:.0f} GB/s  {frac}")


if __name__ == "__main__":
    main()

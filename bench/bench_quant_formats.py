"""CPU dequant throughput per quantized format: ckptflow's table paths vs each format's reference.

References, run in the same process on the same data, interleaved (ref, ours, ref, …) so both
see the same moments of a noisy machine; the median of each is kept:
- FP8 block, BF16 / E8M0 scales: the naive formula (scales repeat_interleave'd, float32 multiply)
- FP8 per-channel: compressed-tensors' FloatQuantizationCompressor.decompress
- FP8 per-tensor (ModelOpt): `(w.float() * s).to(bf16)`
- MXFP4 (gpt-oss experts): transformers' convert_moe_packed_tensors
- NVFP4 compressed-tensors: NVFP4PackedCompressor.decompress
- NVFP4 ModelOpt: NVFP4QTensor.dequantize's recipe (unpack, E2M1 gather, float32 scale product)
Every pair is checked equal (NaN-aware) before it is timed. GB/s counts bytes read (packed
weight; scales are < 7 %) and bytes written (BF16). Peak RSS: each (format, implementation)
runs once alone in a child process, which reports how far its resident memory rose above where
it stood before the call (sampled every 0.5 ms, after malloc_trim); the output itself is 28 MiB
for FP8 and NVFP4, 63 MiB for MXFP4.

    python bench/bench_quant_formats.py [--repeat 5] [--no-rss] [--only mxfp4,...]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import mib, run_measured  # noqa: E402
from ckptflow.tasks.kernels.dispatch import (  # noqa: E402
    fp8_scaled_dequant, mxfp4_gpt_oss, nvfp4_dequant, weight_dequant,
)

ROWS, COLS = 2048, 7168  # DeepSeek-V3 expert gate/up
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])


def _bytes(shape: tuple[int, ...], lo: int = 0, hi: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _fp8() -> torch.Tensor:
    """Random e4m3 codes without NaNs, made without a float32 temporary (it would dominate the
    baseline's peak RSS)."""
    w = _bytes((ROWS, COLS), seed=1)
    w[(w & 0x7F) == 0x7F] = 0x7E
    return w.view(torch.float8_e4m3fn)


def _naive_block(w: torch.Tensor, s32: torch.Tensor) -> torch.Tensor:
    full = s32.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def _ct_scheme(**kw):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(symmetric=True, type="float", **kw))


def fmt_fp8_block_bf16():
    w, s = _fp8(), (torch.rand(16, 56, generator=torch.Generator().manual_seed(2)) * 1e-3).to(torch.bfloat16)
    return (lambda: weight_dequant(w, s, 128, backend="torch"), lambda: _naive_block(w, s.float()), w.numel())


def fmt_fp8_block_e8m0():
    w, s = _fp8(), _bytes((16, 56), 110, 130, 3)
    s32 = s.view(torch.float8_e8m0fnu).to(torch.float32)
    return (lambda: weight_dequant(w, s, 128, backend="torch", scale_dtype="F8_E8M0"),
            lambda: _naive_block(w, s32), w.numel())


def fmt_fp8_channel_ct():
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    w, s = _fp8(), (torch.rand(ROWS, 1, generator=torch.Generator().manual_seed(4)) * 1e-3).to(torch.bfloat16)
    scheme = _ct_scheme(num_bits=8, strategy="channel")
    return (lambda: fp8_scaled_dequant(w, s, backend="torch"),
            lambda: FloatQuantizationCompressor.decompress({"weight": w, "weight_scale": s}, scheme)["weight"],
            w.numel())


def fmt_fp8_tensor_modelopt():
    w, s = _fp8(), torch.tensor(0.0173)
    return (lambda: fp8_scaled_dequant(w, s, backend="torch"), lambda: (w.to(torch.float32) * s).to(torch.bfloat16),
            w.numel())


def fmt_mxfp4_gpt_oss():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _bytes((2, 5760, 90, 16), seed=5), _bytes((2, 5760, 90), 118, 130, 6)  # 2 gpt-oss experts
    return (lambda: mxfp4_gpt_oss(blocks, scales, backend="torch"),
            lambda: convert_moe_packed_tensors(blocks, scales), blocks.numel())


def _nvfp4_inputs():
    return _bytes((ROWS, COLS // 2), seed=7), _bytes((ROWS, COLS // 16), 0x20, 0x7E, 8)


def fmt_nvfp4_ct():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    packed, scale = _nvfp4_inputs()
    gs = torch.tensor([2.5e-3])
    state = {"weight_packed": packed, "weight_scale": scale.view(torch.float8_e4m3fn), "weight_global_scale": gs}
    scheme = _ct_scheme(num_bits=4, strategy="tensor_group", group_size=16)
    return (lambda: nvfp4_dequant(packed, scale, gs, "compressed-tensors", backend="torch"),
            lambda: NVFP4PackedCompressor.decompress(state, scheme)["weight"], packed.numel())


def _modelopt_recipe(packed: torch.Tensor, scale: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    unpacked = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.bfloat16)
    unpacked[..., 1::2] = packed >> 4
    unpacked[..., 0::2] = packed & 0x0F
    x = E2M1[unpacked.reshape(-1).long()].reshape(unpacked.shape)
    eff = scale.view(torch.float8_e4m3fn).to(torch.float32) * s2
    return (x.view(x.shape[0], -1, 16) * eff.unsqueeze(-1)).reshape(x.shape).to(torch.bfloat16)


def fmt_nvfp4_modelopt():
    packed, scale = _nvfp4_inputs()
    s2 = torch.tensor(3.1e-4)
    return (lambda: nvfp4_dequant(packed, scale, s2, "modelopt", backend="torch"),
            lambda: _modelopt_recipe(packed, scale, s2), packed.numel())


FORMATS: dict[str, Callable] = {
    "fp8-block-bf16": fmt_fp8_block_bf16, "fp8-block-e8m0": fmt_fp8_block_e8m0,
    "fp8-channel-ct": fmt_fp8_channel_ct, "fp8-tensor-modelopt": fmt_fp8_tensor_modelopt,
    "mxfp4-gpt-oss": fmt_mxfp4_gpt_oss, "nvfp4-ct": fmt_nvfp4_ct, "nvfp4-modelopt": fmt_nvfp4_modelopt,
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    ok = ~a.isnan()
    return torch.equal(a.view(torch.int16)[ok], b.view(torch.int16)[ok])


def timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, impl: str) -> None:
    """Run one implementation once; print how far resident memory rose above where it stood."""
    ours, ref, _ = FORMATS[name]()
    fn = ours if impl == "ours" else ref
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed input-building scratch back first
    before, peak, done = _rss_now(), [0], threading.Event()

    def sample() -> None:  # the kernels release the GIL, so this keeps sampling during them
        while not done.is_set():
            peak[0] = max(peak[0], _rss_now())
            time.sleep(0.0005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    fn()
    done.set()
    watcher.join()
    print(max(peak[0], _rss_now()) - before)


def peak_rss(name: str) -> tuple[int, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    return tuple(int(run_measured(cmd + [impl])[2].split()[-1]) for impl in ("ours", "ref"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--child", nargs=2, metavar=("FORMAT", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    names = [n for n in FORMATS if not args.only or n in args.only.split(",")]
    rss = {n: ("", "") if args.no_rss else tuple(mib(x) for x in peak_rss(n)) for n in names}
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'format':>20}{'in MB':>8}{'ref GB/s in':>12}{'ours GB/s in':>13}{'ours GB/s out':>14}{'ratio':>7}"
          f"{'ours RSS':>10}{'ref RSS':>10}  same")
    for name in names:
        ours, ref, n_in = FORMATS[name]()
        out = ours()
        ok = same(out, ref())
        if not ok:
            raise SystemExit(f"{name}: ours differs from the reference")
        t_ref, t_ours = [], []
        for _ in range(args.repeat):
            t_ref.append(timed(ref))
            t_ours.append(timed(ours))
        tr, to = statistics.median(t_ref), statistics.median(t_ours)
        print(f"{name:>20}{n_in / 1e6:8.1f}{n_in / tr / 1e9:12.3f}{n_in / to / 1e9:13.3f}"
              f"{out.numel() * 2 / to / 1e9:14.3f}{tr / to:7.2f}{rss[name][0]:>10}{rss[name][1]:>10}  {ok}")


if __name__ == "__main__":
    main()

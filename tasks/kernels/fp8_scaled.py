"""FP8 e4m3 with a per-tensor or per-channel scale → BF16, as compressed-tensors and ModelOpt write it.

compressed-tensors `float-quantized` (strategy tensor or channel) stores `weight` FP8 [OUT, IN]
and `weight_scale` [1] / [] or [OUT, 1]; ModelOpt FP8 stores `weight` and a float32 scalar
`weight_scale`. Both *multiply*. compressed-tensors' own decompression
(`quantization/lifecycle/forward_helpers._dequantize`) computes

    out = (weight.to(scale.dtype) * scale).to(out_dtype)

so the multiply happens in the *scale's* dtype: float32 scales give float32 products, BF16
scales BF16 products (fp8 × bf16 is exact in float32, so that is one rounding), FP16 scales an
FP16 product that is rounded again to BF16. That is what every backend here returns, bit for bit,
except that every NaN is written as all-ones bits (see `lut.canonical_nan`).
The block strategy (`weight_scale` [ceil(OUT/bm), ceil(IN/bn)]) is `weight_dequant` with that
scale: for float32 and bfloat16 scales the two definitions give the same bits.

The CPU path gathers from tables built with exactly those torch ops over the 256 codes: one
table for a per-tensor scale, one per row for a per-channel scale.
"""
from __future__ import annotations

import numpy as np
import torch

from ckptflow.tasks.kernels.lut import canonical_nan, gather_row_tables, int_view, out_tensor

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "torch", "triton")


def check_fp8_scaled(weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> str:
    """Shape/dtype checks (ValueError naming the mismatch); returns "tensor" or "channel"."""
    if not isinstance(weight, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise ValueError("weight and scale must be torch tensors")
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"weight must be float8_e4m3fn (F8_E4M3) or its uint8 bytes, got {weight.dtype}")
    if scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"scale must be float32, bfloat16 or float16, got {scale.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [OUT, IN], got shape {list(weight.shape)}")
    if scale.numel() == 1 and scale.dim() <= 1:
        return "tensor"
    if tuple(scale.shape) in ((weight.shape[0], 1), (weight.shape[0],)):
        return "channel"
    raise ValueError(f"scale shape {list(scale.shape)} fits neither a per-tensor scale ([] or [1]) nor a "
                     f"per-channel one ([{weight.shape[0]}, 1] or [{weight.shape[0]}]) of weight {list(weight.shape)}")


def fp8_scaled_tables(scale: torch.Tensor, out_dtype: torch.dtype) -> np.ndarray:
    """Raw result bits [rows or 1, 256]: row r, code c → out_dtype(code.to(scale.dtype) * scale[r])."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(scale.dtype)
    s = scale.detach().cpu().reshape(-1, 1)
    return int_view(canonical_nan((values[None, :] * s).to(out_dtype)))


def torch_fp8_scaled_dequant(weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU table path on a whole [OUT, IN] weight (or any row range with its scale rows);
    a GPU weight is computed on the CPU and moved (into `out` when given)."""
    check_fp8_scaled(weight, scale, out_dtype)
    on_cpu = weight.device.type == "cpu"
    res = out_tensor(out if on_cpu else None, tuple(weight.shape), out_dtype, torch.device("cpu"))
    if res.numel():
        codes = weight.detach().cpu().contiguous().view(torch.uint8).numpy()
        gather_row_tables(codes, fp8_scaled_tables(scale, out_dtype), int_view(res))
    if on_cpu:
        return res
    return res.to(weight.device) if out is None else out.copy_(res)


def fp8_scaled_dequant(weight: torch.Tensor, scale: torch.Tensor, *, backend: str = "auto",
                       out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize FP8 e4m3 `weight` [OUT, IN] with a per-tensor ([] / [1]) or per-channel
    ([OUT, 1] / [OUT]) `scale` (float32, bfloat16 or float16): `(w.to(scale.dtype) * scale).to(out_dtype)`.

    A row range of the weight works with the matching scale rows (or the same per-tensor scale).
    backend: "torch" (tables; on a GPU weight computed on the CPU and moved), "triton", or "auto"
    (Triton on CUDA, else torch). `out`: a contiguous tensor to write into (same shape/dtype/device).
    Raises ValueError on a shape or dtype mismatch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_fp8_scaled(weight, scale, out_dtype)
    if backend == "triton" or (backend == "auto" and weight.device.type == "cuda"):
        from ckptflow.tasks.kernels.fp8_scaled_triton import triton_fp8_scaled_dequant

        return triton_fp8_scaled_dequant(weight, scale.to(weight.device), out_dtype=out_dtype, out=out)
    if out is not None:
        out_tensor(out, tuple(weight.shape), out_dtype, weight.device)
    return torch_fp8_scaled_dequant(weight, scale, out_dtype, out)

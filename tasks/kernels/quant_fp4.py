"""BF16/FP16/FP32 weights → E2M1 (FP4) pairs: NVFP4 (FP8 scale per 16, F32 global scale) and MXFP4
(E8M0 scale per 32), as compressed-tensors 0.19 / llm-compressor 0.14 compute them.

E2M1 rounding (`quantization/utils/fp4_utils.py:cast_to_fp4`, CPU; `_round_to_fp4`, Triton): clamp
to ±6, then round half to even onto 0, .5, 1, 1.5, 2, 3, 4, 6 (ties 0.25→0, 0.75→1, 1.25→1,
1.75→2, 2.5→2, 3.5→4, 5→4); done here by table lookups on the bits (`e2m1_encode.py`).
Codes (`compressors/nvfp4/helpers.py:pack_fp4_to_uint8`): magnitude index | 8 for the sign bit of
the rounded value, which is set for a negative value that rounds to zero (code 8) and clear for
an input ±0.0 (their torch.sign(-0.0) is 0); two codes per byte, element 2k in the low nibble.

NVFP4 (scheme NVFP4A16, strategy TENSOR_GROUP, group 16):
  global scale: `nvfp4_global_scale` below (`quantization/utils/helpers.py:generate_gparam`).
  group scale (`calculate_qparams`): s = amax16 / 6 in the weight's dtype (one rounding); then
    `global_scale * s` in float32 (float32 [1] × dtype tensor promotes); clamp ±448 and cast to
    float8_e4m3fn (RNE) and back (`round_to_quantized_type_dtype`); 0 → 0.125 (`_get_dtype_eps`
    of e4m3). The parameter that keeps it has the weight's dtype, which holds every e4m3 value
    exactly; the compressor writes it as float8_e4m3fn (`NVFP4PackedCompressor._compress_scale`).
  codes (`forward_helpers.py:_quantize`): eff = scale / global_scale in float32, x / eff in float32
    (x widened exactly), E2M1. The Triton path (`_quantize_kernel`) does the same two `div_rn`
    in float32, so for NVFP4 "fp32" and "llmcompressor-cpu" are the same bytes.
MXFP4 (scheme MXFP4A16, strategy GROUP, group 32, `quantization/utils/mxfp_utils.py`):
  scale: p = `round_to_power_2(amax32)` (add 1 << (mantissa - 2) to the bits, keep sign+exponent),
    e = 127 + floor(log2(p)) - 2 in the weight's dtype (`generate_mx_scales`), clamp to [0, 255]
    and round (`round_to_quantized_type_dtype`, uint8), then s = 2 ** float32(e - 127) cast to the
    weight's dtype (`maybe_convert_from_mx_exp`); s == 0 (float16 underflow) → 1 (`_get_dtype_eps`
    of uint8). Stored as 127 + floor(log2(s)) (`compressors/mx_utils.py:compress_mx_scale`).
  codes: "llmcompressor-cpu": x / s in the weight's dtype (exact for bfloat16 and float32 except
    where the quotient is subnormal); "fp32": in float32 (the Triton path); then E2M1.
"""
from __future__ import annotations

import numpy as np
import torch

from ckptflow.tasks.kernels.e2m1_encode import e2m1_codes, encode_into, pack_into
from ckptflow.tasks.kernels.lut import out_tensor
from ckptflow.tasks.kernels.quant_common import (
    Rounding, check_finite, check_rounding, check_weight, for_row_chunks, signed_amax,
)

__all__ = ["e2m1_codes", "mxfp4_quantize", "mxfp4_scale", "nvfp4_global_scale", "nvfp4_group_scale", "nvfp4_quantize"]

E2M1_MAX = 6.0
FP8_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
NVFP4_SCALE_EPS = 0.125  # compressed-tensors' _get_dtype_eps(float8_e4m3fn)
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _check_groups(w: torch.Tensor, group: int, what: str) -> None:
    if w.shape[1] % group:
        raise ValueError(f"{what}: columns ({w.shape[1]}) must be a multiple of {group}")


# ---------------------------------------------------------------- NVFP4

def nvfp4_global_scale(amax_of_group: torch.Tensor) -> torch.Tensor:
    """448·6 / amax as compressed-tensors evaluates it, 0-d float32.

    `quantization/utils/helpers.py:generate_gparam` (called by llm-compressor's
    `observers/base.py:Observer.get_global_scale` with the fused group's amax, in the weight's dtype):
      max_val_pos = clamp(amax, min=finfo(dtype).tiny)
      global_scale = 448.0 * 6.0 / max_val_pos   # python float / tensor: torch's Tensor.__rtruediv__
                                                  # is reciprocal(t) * 2688, two roundings to dtype
      nan_to_num(nan=1, posinf=1, neginf=1).to(float32)
    For bfloat16 that is bf16(bf16(1/amax) · 2688), not bf16(2688/amax): they differ on some amax.
    An all-zero group (amax 0 → tiny → inf) gets 1.0, as there."""
    if not isinstance(amax_of_group, torch.Tensor) or amax_of_group.numel() != 1 \
            or not amax_of_group.dtype.is_floating_point:
        raise ValueError("nvfp4_global_scale needs a one-element floating amax tensor")
    amax = amax_of_group.reshape(())
    check_finite(amax, "nvfp4_global_scale")
    amax = torch.clamp(amax, min=torch.finfo(amax.dtype).tiny)
    gs = torch.reciprocal(amax) * (FP8_MAX * E2M1_MAX)
    gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.to(torch.float32)


def nvfp4_group_scale(amax16: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-16 amax (weight dtype) → the float32 value of each float8_e4m3fn group scale."""
    s = amax16 / E2M1_MAX  # weight dtype, one rounding
    s = s.to(torch.float32) * global_scale.to(torch.float32).reshape(())  # float32, as their [1] × s promotes
    # (a 0-d float32 times a bfloat16 tensor would stay bfloat16: widen explicitly)
    s = torch.clamp(s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return torch.where(s == 0, torch.tensor(NVFP4_SCALE_EPS), s)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor, rounding: Rounding = "fp32", *,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] (c a multiple of 16) with its fused group's `nvfp4_global_scale` → (packed uint8
    [r, c/2] low nibble first, scale float8_e4m3fn [r, c/16]). Rows are independent: any row slice
    works alone. `rounding` is accepted for symmetry; both give the same bytes (see module doc)."""
    check_weight(w, "nvfp4_quantize")
    check_rounding(rounding)
    _check_groups(w, NVFP4_GROUP, "nvfp4_quantize")
    if not isinstance(global_scale, torch.Tensor) or global_scale.numel() != 1 \
            or global_scale.dtype != torch.float32:
        raise ValueError("nvfp4_quantize needs a one-element float32 global scale (nvfp4_global_scale)")
    check_finite(global_scale, "nvfp4_quantize global scale")
    rows, cols = w.shape
    packed = out_tensor(out, (rows, cols // 2), torch.uint8, w.device).numpy()  # `out`: a pooled buffer
    scale = torch.empty((rows, cols // NVFP4_GROUP), dtype=torch.float8_e4m3fn)
    gs = global_scale.to(torch.float32).reshape(())
    bad: list[bool] = []

    def work(a: int, b: int) -> None:
        x = w[a:b].reshape(b - a, -1, NVFP4_GROUP)
        amax = signed_amax(x, dim=2)
        bad.append(not bool(torch.isfinite(amax).all()))
        s = nvfp4_group_scale(amax, gs)
        scale[a:b] = s.to(torch.float8_e4m3fn)
        eff = s / gs  # float32, one rounding
        y = x.to(torch.float32, copy=True).div_(eff[:, :, None])  # x widened exactly, one rounding
        codes = np.empty((b - a, cols), dtype=np.uint8)
        encode_into(y.reshape(b - a, cols), codes)
        pack_into(codes, packed[a:b])

    if w.numel():
        for_row_chunks(rows, cols, work)
    if any(bad):
        check_finite(torch.tensor(float("nan")), "nvfp4_quantize")
    return torch.from_numpy(packed), scale


# ---------------------------------------------------------------- MXFP4

def _round_to_power_2(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors `mxfp_utils.round_to_power_2`: add 1 << (mantissa - 2), keep sign+exponent."""
    mant = _MANTISSA[x.dtype]
    bits = x.view(_INT[x.dtype]).to(torch.int32) if x.dtype != torch.float32 else x.view(torch.int32)
    if x.dtype != torch.float32:
        bits = bits & 0xFFFF  # their uint16 view widened: no sign extension
    keep = ((1 << (x.dtype.itemsize * 8 - mant)) - 1) << mant
    out = (bits + (1 << (mant - 2))) & keep
    if x.dtype == torch.float32:
        return out.view(torch.float32)
    return out.to(torch.uint16).view(x.dtype)


def mxfp4_scale(amax32: torch.Tensor) -> torch.Tensor:
    """Per-32 amax (weight dtype) → the scale in the weight's dtype (a power of two; see module doc)."""
    dtype = amax32.dtype
    e = 127 + torch.floor(torch.log2(_round_to_power_2(amax32))) - 2  # weight dtype
    e = torch.round(torch.clamp(e, 0, 255)).to(torch.uint8).to(dtype)
    s = (2.0 ** (e.to(torch.int32) - 127).to(torch.float32)).to(dtype)
    return torch.where(s == 0, torch.ones((), dtype=dtype), s)


def mxfp4_quantize(w: torch.Tensor, rounding: Rounding = "fp32", *, out: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] (c a multiple of 32) → (packed uint8 [r, c/2] low nibble first, scale uint8 E8M0
    [r, c/32]). Rows are independent: any row slice works alone."""
    check_weight(w, "mxfp4_quantize")
    check_rounding(rounding)
    _check_groups(w, MXFP4_GROUP, "mxfp4_quantize")
    rows, cols = w.shape
    packed = out_tensor(out, (rows, cols // 2), torch.uint8, w.device).numpy()  # `out`: a pooled buffer
    stored = torch.empty((rows, cols // MXFP4_GROUP), dtype=torch.uint8)
    bad: list[str] = []

    def work(a: int, b: int) -> None:
        x = w[a:b].reshape(b - a, -1, MXFP4_GROUP)
        amax = signed_amax(x, dim=2)
        if not bool(torch.isfinite(amax).all()):
            bad.append("NaN or inf")
            return
        scale = mxfp4_scale(amax)
        if bool(torch.isinf(scale).any()):
            bad.append(f"{float(amax.max())}")
            return
        if rounding == "fp32":
            y = x.to(torch.float32, copy=True).div_(scale.to(torch.float32)[:, :, None])  # float32
        else:
            y = x / scale[:, :, None]  # weight dtype
        codes = np.empty((b - a, cols), dtype=np.uint8)
        encode_into(y.reshape(b - a, cols).contiguous(), codes)
        pack_into(codes, packed[a:b])
        # compressors/mx_utils.py:compress_mx_scale: 127 + floor(log2(scale)) (exact for powers of two)
        stored[a:b] = (127 + torch.floor(torch.log2(scale.to(torch.float32))).to(torch.int32)).to(torch.uint8)

    if w.numel():
        for_row_chunks(rows, cols, work)
    if "NaN or inf" in bad:
        check_finite(torch.tensor(float("nan")), "mxfp4_quantize")
    if bad:
        # amax so close to the dtype's max that round_to_power_2 overflows: compressed-tensors' scale is
        # 2^128 (inf), every code 0 and its E8M0 code garbage (log2(inf) cast to int32); refuse instead
        raise ValueError(f"mxfp4_quantize: a 32-group's amax ({bad[0]}) rounds up past the dtype's largest "
                         "power of two; its E8M0 scale would overflow")
    return torch.from_numpy(packed), stored

"""BF16/FP16/FP32 weights → FP8 e4m3 with 128×128 block scales (FP8_BLOCK) or per-row scales
(FP8_DYNAMIC's weights), as compressed-tensors 0.19 / llm-compressor 0.14 compute them.

Scale (both schemes), in the weight's dtype throughout, because the observer's statistics are in
it and the `weight_scale` parameter is created in it (`quantization/lifecycle/initialize.py:
initialize_qparams`: scale dtype = observed dtype):
  1. amax per block / row: `quant_common.signed_amax` (observer amin/amax, then calculate_qparams).
  2. scale = amax / 448: `calculate_qparams` computes `max_val_pos / (bit_range.to(dtype) / 2)`,
     bit_range = 448 - (-448) (`calculate_range`), so one division by 448 rounded to the dtype.
  3. scale == 0 (an all-zero block or row) → `torch.finfo(dtype).eps` (`calculate_qparams` step 5,
     `_get_dtype_eps`): the block then quantizes to code 0, never NaN. Stored as is (no cast).
Codes (`quantization/lifecycle/forward_helpers.py`):
  - "llmcompressor-cpu": `_quantize`: `x / scale` with both in the weight's dtype (one rounding to
    it), `round_to_quantized_type_args`: clamp to ±448, `.to(float8_e4m3fn)` (a second, RNE,
    rounding), back to the weight's dtype (exact), and the compressor casts to FP8 (exact).
  - "fp32" (default): `_quantize_kernel` (Triton, CUDA): `tl.div_rn(float32(x), float32(scale))`, one
    rounding to float32, clamp ±448, `.to(tl.float8e4nv)` (RNE). torch's float32 → e4m3fn cast is the
    same RNE, so this CPU code gives the CUDA path's bytes.
Ragged FP8_BLOCK weights: `compressors/naive_quantized/base.py:compress` pads with zeros to multiples
of 128, quantizes, and cuts the codes back to the weight's shape; the scale grid keeps its partial
tiles ([ceil(r/128), ceil(c/128)]). Done the same here (`quant_common.pad_to_blocks`).
"""
from __future__ import annotations

import torch

from ckptflow.tasks.kernels.quant_common import (
    Rounding, block_amax, block_view, check_finite, check_rounding, check_weight, pad_to_blocks, signed_amax,
)

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, compressed-tensors' FP8_E4M3_DATA.max
BLOCK = 128  # FP8_BLOCK's block_structure [128, 128]


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in amax's dtype, zeros replaced by that dtype's eps (steps 2-3 above)."""
    scale = amax / FP8_MAX
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype)
    return torch.where(scale == 0, eps, scale)


def fp8_codes(w: torch.Tensor, scale: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """float8_e4m3fn codes of w / scale (scale broadcast against w), with the rounding's op order."""
    if rounding == "fp32":
        q = w.to(torch.float32) / scale.to(torch.float32)
    else:
        q = w / scale  # both in the weight's dtype: torch rounds the quotient to it
    return torch.clamp(q, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_block_quantize(w: torch.Tensor, rounding: Rounding = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] → (q float8_e4m3fn [r, c], scale [ceil(r/128), ceil(c/128)] in w.dtype).

    A row slice of a larger weight gives that slice's rows of the whole result when it starts on a
    128-row boundary (tiles never straddle it). Raises ValueError on a bad shape, dtype, rounding,
    or a NaN/inf in w."""
    check_weight(w, "fp8_block_quantize")
    check_rounding(rounding)
    rows, cols = w.shape
    amax = block_amax(w, BLOCK)
    check_finite(amax, "fp8_block_quantize")
    scale = fp8_scale_from_amax(amax)
    if w.numel() == 0:
        return torch.empty((rows, cols), dtype=torch.float8_e4m3fn), scale
    tiles = block_view(pad_to_blocks(w, BLOCK), BLOCK)
    q = fp8_codes(tiles, scale[:, None, :, None], rounding).reshape(tiles.shape[0] * BLOCK, -1)
    if q.shape != (rows, cols):
        q = q[:rows, :cols].contiguous()
    return q, scale


def fp8_channel_quantize(w: torch.Tensor, rounding: Rounding = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] → (q float8_e4m3fn [r, c], scale [r, 1] in w.dtype: the dtype llm-compressor writes
    FP8_DYNAMIC's `weight_scale` in). Rows are independent: any row slice works alone."""
    check_weight(w, "fp8_channel_quantize")
    check_rounding(rounding)
    rows, cols = w.shape
    if w.numel() == 0:
        amax = torch.zeros((rows, 1), dtype=w.dtype)
    else:
        amax = signed_amax(w, dim=1).reshape(rows, 1)
    check_finite(amax, "fp8_channel_quantize")
    scale = fp8_scale_from_amax(amax)
    return fp8_codes(w, scale, rounding), scale

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
tiles ([ceil(r/128), ceil(c/128)]). Done the same here: each 128-row tile is padded to whole column blocks,
quantized and cut; a short last tile needs no row padding (zeros change no amax, code 0 is cut).
"""
from __future__ import annotations

import torch

from ckptflow.tasks.kernels.lut import out_tensor
from ckptflow.tasks.kernels.quant_common import (
    Rounding, check_finite, check_rounding, check_weight, for_row_chunks, signed_amax,
)

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, compressed-tensors' FP8_E4M3_DATA.max
BLOCK = 128  # FP8_BLOCK's block_structure [128, 128]


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in amax's dtype, zeros replaced by that dtype's eps (steps 2-3 above)."""
    scale = amax / FP8_MAX
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype)
    return torch.where(scale == 0, eps, scale)


def fp8_codes_into(x: torch.Tensor, scale: torch.Tensor, rounding: Rounding, out: torch.Tensor) -> None:
    """float8_e4m3fn codes of x / scale (scale broadcast against x) into `out`, with the rounding's op order."""
    if rounding == "fp32":
        # widen (exact), then divide in place: the bits of a mixed-dtype division, several times faster
        y = x.to(torch.float32, copy=True).div_(scale.to(torch.float32))
    else:
        y = x / scale  # both in the weight's dtype: torch rounds the quotient to it
    out.copy_(y.clamp_(-FP8_MAX, FP8_MAX).reshape(out.shape[0], -1)[:, :out.shape[1]])  # copy_ casts (RNE)


def fp8_block_quantize(w: torch.Tensor, rounding: Rounding = "fp32", *, out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] → (q float8_e4m3fn [r, c], scale [ceil(r/128), ceil(c/128)] in w.dtype).

    A row slice of a larger weight gives that slice's rows of the whole result when it starts on a
    128-row boundary (tiles never straddle it). Raises ValueError on a bad shape, dtype, rounding,
    or a NaN/inf in w."""
    check_weight(w, "fp8_block_quantize")
    check_rounding(rounding)
    rows, cols = w.shape
    tiles, nb = -(-rows // BLOCK), -(-cols // BLOCK)
    q = out_tensor(out, (rows, cols), torch.float8_e4m3fn, w.device)  # `out`: a caller's pooled buffer
    scale = torch.empty((tiles, nb), dtype=w.dtype)
    if w.numel() == 0:
        return q, scale.fill_(torch.finfo(w.dtype).eps)

    def work(t0: int, t1: int) -> None:  # one 128-row tile at a time (the last may be shorter)
        for t in range(t0, t1):
            x = w[t * BLOCK:(t + 1) * BLOCK]
            if cols % BLOCK:  # compressed-tensors' zero padding, per tile
                x = torch.nn.functional.pad(x, (0, -cols % BLOCK))
            v = x.reshape(x.shape[0], nb, BLOCK)
            s = fp8_scale_from_amax(signed_amax(v, dim=(0, 2)))
            scale[t] = s
            fp8_codes_into(v, s[None, :, None], rounding, q[t * BLOCK:(t + 1) * BLOCK])

    for_row_chunks(tiles, BLOCK * cols, work, rows_per_step=1)
    check_finite(scale, "fp8_block_quantize")
    return q, scale


def fp8_channel_quantize(w: torch.Tensor, rounding: Rounding = "fp32", *, out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] → (q float8_e4m3fn [r, c], scale [r, 1] in w.dtype: the dtype llm-compressor writes
    FP8_DYNAMIC's `weight_scale` in). Rows are independent: any row slice works alone."""
    check_weight(w, "fp8_channel_quantize")
    check_rounding(rounding)
    rows, cols = w.shape
    q = out_tensor(out, (rows, cols), torch.float8_e4m3fn, w.device)  # `out`: a caller's pooled buffer
    scale = torch.empty((rows, 1), dtype=w.dtype)
    if w.numel() == 0:
        return q, scale.fill_(torch.finfo(w.dtype).eps)

    def work(a: int, b: int) -> None:
        s = fp8_scale_from_amax(signed_amax(w[a:b], dim=1).reshape(b - a, 1))
        scale[a:b] = s
        fp8_codes_into(w[a:b], s, rounding, q[a:b])

    for_row_chunks(rows, cols, work)
    check_finite(scale, "fp8_channel_quantize")
    return q, scale

"""FP8 e4m3 × per-tensor / per-channel scale in Triton, bit-identical to `fp8_scaled.py`'s tables.

The reference (`(w.to(scale.dtype) * scale).to(out_dtype)`, compressed-tensors' order) rounds up
to twice: to the scale's dtype, then to out_dtype. torch's CPU bf16/fp16 multiply is a float32
multiply rounded to 16 bits, so the kernel does the same on bits: float32 product, round to
the scale dtype, widen (exact), round to out_dtype. NaN → all-ones bits (see triton_bits.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckptflow.tasks.kernels.fp8_scaled import check_fp8_scaled
from ckptflow.tasks.kernels.fp8_triton import _f32_bits_to_f16_bits
from ckptflow.tasks.kernels.lut import out_tensor
from ckptflow.tasks.kernels.triton_bits import (
    OUT_KIND, bits_to_out, check_triton_device, e4m3_to_f32_bits, f32_bits_to_bf16_bits, out_pointer, store_out,
)

_SCALE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _fp8_scaled_kernel(
    w_ptr,  # *uint8 [R, C] contiguous: e4m3fn codes
    s_ptr,  # *scale dtype: [R] per channel, or [1] per tensor
    out_ptr,  # *fp32, or *int16 holding bf16/fp16 bits, [R, C]
    R,  # rows
    C,  # columns (the row stride)
    PER_CHANNEL: tl.constexpr,  # one scale per row, else one for the tensor
    SCALE_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16: the dtype the product rounds to first
    OUT_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    TILE_R: tl.constexpr,  # rows per program
    TILE_C: tl.constexpr,  # columns per program
):
    rows = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    cols = tl.program_id(1) * TILE_C + tl.arange(0, TILE_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]  # int64: big matrices pass 2^31 elements
    w = e4m3_to_f32_bits(tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32)).to(tl.float32, bitcast=True)
    if PER_CHANNEL:
        s = tl.load(s_ptr + rows, mask=rows < R, other=1).to(tl.float32)[:, None]  # widening is exact
    else:
        s = tl.load(s_ptr).to(tl.float32)
    p = (w * s).to(tl.uint32, bitcast=True)  # exact for 16-bit scales (4 x 11 significant bits)
    if SCALE_KIND == 1:  # the bf16 multiply's own rounding, then back to float32 bits
        p = tl.where((p & 0x7FFFFFFF) > 0x7F800000, p, f32_bits_to_bf16_bits(p) << 16)
    elif SCALE_KIND == 2:
        h = _f32_bits_to_f16_bits(p).to(tl.uint16).to(tl.float16, bitcast=True)
        p = tl.where((p & 0x7FFFFFFF) > 0x7F800000, p, h.to(tl.float32).to(tl.uint32, bitcast=True))
    store_out(out_ptr, offs, bits_to_out(p, OUT_KIND), mask, OUT_KIND)


def triton_fp8_scaled_dequant(weight: torch.Tensor, scale: torch.Tensor, *,
                              out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `fp8_scaled_dequant` (checks included); CPU tensors need TRITON_INTERPRET=1."""
    strategy = check_fp8_scaled(weight, scale, out_dtype)
    check_triton_device(weight, _fp8_scaled_kernel)
    if scale.device != weight.device:
        raise ValueError(f"weight and scale are on different devices ({weight.device}, {scale.device})")
    w = weight.contiguous().view(torch.uint8)
    out = out_tensor(out, tuple(weight.shape), out_dtype, weight.device)
    if out.numel() == 0:
        return out
    rows, cols = w.shape
    tile_r, tile_c = (16, 128) if w.device.type == "cuda" else (64, 512)  # the interpreter pays per program
    grid = (triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c))
    _fp8_scaled_kernel[grid](w, scale.contiguous().reshape(-1), out_pointer(out), rows, cols,
                             PER_CHANNEL=strategy == "channel", SCALE_KIND=_SCALE_KIND[scale.dtype],
                             OUT_KIND=OUT_KIND[out_dtype], TILE_R=tile_r, TILE_C=tile_c, num_warps=4)
    return out

"""MXFP4 and NVFP4 (E2M1 pairs) → BF16/FP16/FP32 in Triton, bit-identical to `fp4.py`'s tables.

MXFP4 needs no float arithmetic at all: an E2M1 value times 2^(s-127) is the value with its
exponent moved, so the kernel builds the float32 bits with integer ops (exact, and immune to a
GPU flushing the 2^-127 subnormal scale to zero), then rounds explicitly to the output dtype.
NVFP4 multiplies (ModelOpt) or divides (compressed-tensors, `tl.div_rn`: IEEE, not the fast
approximate division) in float32 like the references, then rounds on the bits. NaN results →
all-ones bits, as the CPU tables (see triton_bits.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckptflow.tasks.kernels.fp4 import MX_CONVENTIONS, check_mxfp4, check_nvfp4
from ckptflow.tasks.kernels.lut import out_tensor
from ckptflow.tasks.kernels.triton_bits import (
    OUT_KIND, bits_to_out, check_triton_device, e4m3_to_f32_bits, f32_bits_to_bf16_bits, out_pointer, store_out,
)


@triton.jit
def _e2m1_parts(nib):
    """E2M1 code (uint32 0..15) → (sign bit at 31, float32 biased exponent, mantissa bit, is zero)."""
    mag = nib & 7
    sign = (nib & 8) << 28
    exp = 126 + (mag >> 1)  # 0.5 → 126; 1, 1.5 → 127; 2, 3 → 128; 4, 6 → 129
    mbit = tl.where(mag > 1, mag & 1, 0)  # 1.5, 3 and 6 carry the one mantissa bit
    return sign, exp, mbit, mag == 0


@triton.jit
def _e2m1_f32(nib, SIGNED_ZERO: tl.constexpr):
    """E2M1 code → float32 value, exact. SIGNED_ZERO: code 8 is -0.0 (else +0.0, as ModelOpt)."""
    sign, exp, mbit, zero = _e2m1_parts(nib)
    bits = sign | (exp << 23) | (mbit << 22)
    if SIGNED_ZERO:
        bits = tl.where(zero, sign, bits)
    else:
        bits = tl.where(zero, 0, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_bits(nib, s, CT: tl.constexpr):
    """float32 bits of ldexp(e2m1(nib), s - 127), as torch.ldexp gives them: an exact exponent
    shift, so s = 255 is 2^128 (0.5 → 2^127, larger codes overflow to ±inf, zeros stay ±0).
    CT (compressed-tensors): s = 255 is bf16 inf instead, so ±inf, and NaN for zero codes."""
    sign, exp, mbit, zero = _e2m1_parts(nib)
    ex = exp.to(tl.int32) + s.to(tl.int32) - 127
    normal = sign | (ex.to(tl.uint32) << 23) | (mbit << 22)
    # ex >= -1 always (exp >= 126), so a subnormal needs a right shift of 1 or 2, which is exact.
    shift = tl.maximum(1 - ex, 0).to(tl.uint32)
    sub = sign | ((0x800000 | (mbit << 22)) >> shift)
    bits = tl.where(ex >= 1, normal, sub)
    bits = tl.where(ex >= 255, sign | 0x7F800000, bits)  # overflow: ±inf
    bits = tl.where(zero, sign, bits)
    if CT:
        bits = tl.where(s == 255, tl.where(zero, 0x7FC00000, sign | 0x7F800000), bits)
    return bits


@triton.jit
def _mxfp4_kernel(
    b_ptr,  # *uint8 [NG, 16] contiguous: two E2M1 codes per byte, low nibble first
    s_ptr,  # *uint8 [NG]: E8M0 exponent (bias 127) of each 32-element group
    out_ptr,  # *fp32, or *int16 holding bf16/fp16 bits, [NG, 32]
    NG,  # groups
    OUT_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    TILE_G: tl.constexpr,  # groups per program
    CT: tl.constexpr,  # 1: compressed-tensors' scale 255 (inf), 0: transformers' (2^128)
):
    g = tl.program_id(0).to(tl.int64) * TILE_G + tl.arange(0, TILE_G)
    k = tl.arange(0, 16)
    gmask = g < NG
    mask = gmask[:, None]
    byte = tl.load(b_ptr + g[:, None] * 16 + k[None, :], mask=mask, other=0).to(tl.uint32)
    s = tl.load(s_ptr + g, mask=gmask, other=127).to(tl.uint32)[:, None]
    out = g[:, None] * 32 + 2 * k[None, :]
    store_out(out_ptr, out, bits_to_out(_mxfp4_bits(byte & 15, s, CT), OUT_KIND), mask, OUT_KIND)
    store_out(out_ptr, out + 1, bits_to_out(_mxfp4_bits(byte >> 4, s, CT), OUT_KIND), mask, OUT_KIND)


def triton_mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, *,
                         out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
                         convention: str = "transformers") -> torch.Tensor:
    """The Triton path of `mxfp4_dequant` (checks included); CPU tensors need TRITON_INTERPRET=1."""
    scales = check_mxfp4(blocks, scales, out_dtype)
    if convention not in MX_CONVENTIONS:
        raise ValueError(f"MXFP4 convention must be one of {', '.join(MX_CONVENTIONS)}, got {convention!r}")
    check_triton_device(blocks, _mxfp4_kernel)
    *lead, groups, _ = blocks.shape
    out = out_tensor(out, (*lead, groups * 32), out_dtype, blocks.device)
    ng = scales.numel()
    if ng:
        tile = 64 if blocks.device.type == "cuda" else 1024  # the interpreter pays per program
        _mxfp4_kernel[(triton.cdiv(ng, tile),)](blocks.contiguous(), scales.contiguous(), out_pointer(out), ng,
                                                 OUT_KIND=OUT_KIND[out_dtype], TILE_G=tile,
                                                 CT=convention == "compressed-tensors", num_warps=4)
    return out


@triton.jit
def _nvfp4_value_bits(x, eff, CT: tl.constexpr, OUT_KIND: tl.constexpr):
    """Bits of out_dtype(x * eff); compressed-tensors rounds to bf16 first (its output dtype)."""
    p = (x * eff).to(tl.uint32, bitcast=True)
    if CT:
        p = tl.where((p & 0x7FFFFFFF) > 0x7F800000, p, f32_bits_to_bf16_bits(p) << 16)
    return bits_to_out(p, OUT_KIND)


@triton.jit
def _nvfp4_kernel(
    p_ptr,  # *uint8 [R, P] contiguous: E2M1 pairs, low nibble first
    s_ptr,  # *uint8 [R, SG]: e4m3fn scale codes, one per 16 elements (8 bytes)
    g_ptr,  # *fp32 [1]: global scale (compressed-tensors divides by it, ModelOpt multiplies)
    out_ptr,  # *fp32, or *int16 holding bf16/fp16 bits, [R, C]
    R,  # rows
    P,  # packed bytes per row = ceil(C / 2)
    C,  # output columns
    SG,  # scale groups per row = ceil(C / 16)
    CT: tl.constexpr,  # 1: compressed-tensors convention, 0: ModelOpt
    GS_0D: tl.constexpr,  # compressed-tensors with a 0-dim global scale: its quotient is bf16
    OUT_KIND: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    TILE_R: tl.constexpr,  # rows per program
    TILE_B: tl.constexpr,  # packed bytes per program (a multiple of 8: whole groups)
):
    rows = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    cols = tl.program_id(1) * TILE_B + tl.arange(0, TILE_B)
    mask = (rows[:, None] < R) & (cols[None, :] < P)
    r64 = rows[:, None].to(tl.int64)
    byte = tl.load(p_ptr + r64 * P + cols[None, :], mask=mask, other=0).to(tl.uint32)
    code = tl.load(s_ptr + r64 * SG + cols[None, :] // 8, mask=mask, other=0x38).to(tl.uint32)
    sf = e4m3_to_f32_bits(code).to(tl.float32, bitcast=True)
    gs = tl.load(g_ptr)
    if CT:
        eff = tl.div_rn(sf, gs + tl.zeros_like(sf))
        if GS_0D:
            e = eff.to(tl.uint32, bitcast=True)
            e = tl.where((e & 0x7FFFFFFF) > 0x7F800000, e, f32_bits_to_bf16_bits(e) << 16)
            eff = e.to(tl.float32, bitcast=True)
    else:
        eff = sf * gs
    lo = _nvfp4_value_bits(_e2m1_f32(byte & 15, CT), eff, CT, OUT_KIND)
    hi = _nvfp4_value_bits(_e2m1_f32(byte >> 4, CT), eff, CT, OUT_KIND)
    out = r64 * C + 2 * cols[None, :]
    store_out(out_ptr, out, lo, mask, OUT_KIND)
    store_out(out_ptr, out + 1, hi, mask & (2 * cols[None, :] + 1 < C), OUT_KIND)  # odd C: no padding nibble


def triton_nvfp4_dequant(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, convention: str,
                         columns: int | None = None, *, out_dtype: torch.dtype = torch.bfloat16,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of `nvfp4_dequant` (checks included); CPU tensors need TRITON_INTERPRET=1."""
    scale, cols = check_nvfp4(packed, scale, global_scale, convention, columns, out_dtype)
    check_triton_device(packed, _nvfp4_kernel)
    if global_scale.device != packed.device:
        raise ValueError(f"NVFP4 global scale is on {global_scale.device}, the weight on {packed.device}")
    rows, width = packed.shape
    out = out_tensor(out, (rows, cols), out_dtype, packed.device)
    if out.numel():
        tile_r, tile_b = (16, 64) if packed.device.type == "cuda" else (64, 256)  # interpreter: per program
        grid = (triton.cdiv(rows, tile_r), triton.cdiv(width, tile_b))
        _nvfp4_kernel[grid](packed.contiguous(), scale.contiguous(), global_scale.reshape(1).contiguous(),
                            out_pointer(out), rows, width, cols, scale.shape[1],
                            CT=convention == "compressed-tensors", GS_0D=global_scale.dim() == 0,
                            OUT_KIND=OUT_KIND[out_dtype], TILE_R=tile_r, TILE_B=tile_b, num_warps=4)
    return out

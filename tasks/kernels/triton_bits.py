"""Bit-level helpers for the quantized-format Triton kernels: exact decodes and explicit rounding.

Why bits and not `.to()`: the Triton interpreter truncates float32 → bf16 stores while torch
rounds to nearest-even, and GPUs may lack FP8 loads; integer decodes and rounding on the
float32 bit pattern give the same answer everywhere. NaN results are written as all-ones bits
(bf16 0xFFFF, which is what torch's vectorized CPU cast writes; fp16 0xFFFF; fp32 0xFFFFFFFF),
and the CPU tables are canonicalised the same way (`lut.canonical_nan`): torch's own NaN payloads depend on where an
element falls in its vector loop (scalar tails give 0x7FC0), so only NaN-ness is comparable
with a reference, and that is what the tests check.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ckptflow.tasks.kernels.fp8_triton import _f32_bits_to_f16_bits

OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def e4m3_to_f32_bits(b):
    """uint32 holding an e4m3fn code (0..255) → float32 bits (uint32), exact; NaN codes → NaN."""
    sign = (b & 0x80) << 24
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = sign | ((exp + 120) << 23) | (man << 20)  # rebias 7 -> 127, mantissa 3 -> 23 bits
    subnormal = sign | (man.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m * 2^-9, exact
    bits = tl.where(exp == 0, subnormal, normal)
    return tl.where((b & 0x7F) == 0x7F, sign | 0x7FC00000, bits)


@triton.jit
def f32_bits_to_bf16_bits(p):
    """float32 bits (uint32) → bf16 bits, nearest-even (the carry covers inf and subnormals)."""
    return (p + 0x7FFF + ((p >> 16) & 1)) >> 16


@triton.jit
def bits_to_out(p, OUT_KIND: tl.constexpr):
    """float32 bits (uint32) → the output's bits: uint32 for float32, else 16 bits in a uint32;
    any NaN becomes all-ones."""
    is_nan = (p & 0x7FFFFFFF) > 0x7F800000
    if OUT_KIND == 0:
        r = tl.where(is_nan, 0xFFFFFFFF, p)
    elif OUT_KIND == 1:
        r = tl.where(is_nan, 0xFFFF, f32_bits_to_bf16_bits(p))
    else:
        r = tl.where(is_nan, 0xFFFF, _f32_bits_to_f16_bits(p))
    return r


@triton.jit
def store_out(ptr, offs, r, mask, OUT_KIND: tl.constexpr):
    """Store result bits `r` (from `bits_to_out`) into a float32 or an int16-viewed output."""
    if OUT_KIND == 0:
        tl.store(ptr + offs, r.to(tl.float32, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)


def out_pointer(out: torch.Tensor) -> torch.Tensor:
    return out if out.dtype == torch.float32 else out.view(torch.int16)


def check_triton_device(t: torch.Tensor, kernel) -> None:
    """CPU tensors need the interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    if t.device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise ValueError("the tensor is on the CPU, but Triton kernels need a GPU there: set TRITON_INTERPRET=1 "
                         "before importing triton, or use backend='torch'")

"""Block-wise FP8 (e4m3fn) -> BF16/FP16/FP32 dequantization in Triton (DeepSeek-V3 layout).

``weight[M, N]`` holds e4m3fn codes and ``scale_inv[ceil(M/B), ceil(N/B)]`` one float32
multiplier per ``B x B`` block, so ``out[i, j] = weight[i, j] * scale_inv[i // B, j // B]``.
Stacked expert tensors ``[E, M, N]`` with ``scale_inv[E, ...]`` are handled too.

The result is meant to be bit-identical to the PyTorch CPU path,
``(weight.float() * scale_expanded).to(out_dtype)``, on every backend, including the Triton
CPU interpreter (``TRITON_INTERPRET=1``). Three details make that work:

* e4m3fn codes are loaded as raw bytes and decoded with integer ops. The decode is exact, and
  it does not depend on the interpreter or the GPU supporting ``float8e4nv`` loads.
* bf16/fp16 rounding is done on the float32 bit pattern and stored as int16. A plain
  ``.to(tl.bfloat16)`` truncates in the interpreter, while torch rounds to nearest-even.
* NaNs get fixed bit patterns, those of torch on an x86 CPU. A NaN weight decodes to
  ``sign | 0x7FF00000``, and the multiply carries that payload through. A NaN scale is returned
  quieted, and 0 * inf gives 0xFFC00000. torch's vectorized (AVX2/AVX512) float -> bf16 cast
  writes every NaN as 0xFFFF, and so does this kernel. (c10's scalar cast and the DEFAULT CPU
  capability give 0x7FC0 instead.) For fp16, the NaN keeps its sign and the top 10 payload bits,
  as F16C ``vcvtps2ph`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BF16_NAN_BITS = 0xFFFF  # what torch's vectorized CPU float->bf16 cast writes for any NaN
_BF16_NAN: tl.constexpr = tl.constexpr(BF16_NAN_BITS)  # jit code may only read constexpr globals
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _f32_bits_to_f16_bits(bits):
    """Round float32 bit patterns (uint32) to IEEE fp16 bits, nearest-even, like torch/F16C."""
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    # NaN: keep the top 10 payload bits and force the quiet bit.
    nan = sign | 0x7E00 | ((a >> 13) & 0x3FF)
    # 65520.0 (0x477FF000) is the halfway point between 65504 (odd mantissa) and 2^16 -> inf.
    inf = sign | 0x7C00
    # Normal fp16: rebias the exponent (127 -> 15), then round the 13 dropped bits to nearest-even.
    t = a - 0x38000000
    normal = sign | ((t + 0xFFF + ((t >> 13) & 1)) >> 13)
    # Subnormal fp16 (|x| < 2^-14): units of 2^-24 are mant24 >> (126 - exp). Shifts of 25 or
    # more always round to zero, so clamp the shift there to keep it in range.
    shift = tl.minimum(126 - (a >> 23), 25)
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant - (q << shift)
    half = (mant * 0 + 1) << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.uint32)
    sub = sign | q
    out = tl.where(a >= 0x38800000, normal, sub)
    out = tl.where(a >= 0x477FF000, inf, out)
    return tl.where(a > 0x7F800000, nan, out)


@triton.jit
def _fp8_block_dequant_kernel(
    w_ptr,  # *uint8  [E, M, N] contiguous: raw e4m3fn codes
    s_ptr,  # *fp32   [E, SM, SN] contiguous: one multiplier per BLOCK x BLOCK block
    out_ptr,  # *fp32 for OUT_KIND 0, else *int16 [E, M, N] holding bf16/fp16 bit patterns
    M,  # rows per expert
    N,  # columns (also the row stride, because inputs are contiguous)
    SM,  # scale rows = ceil(M / BLOCK)
    SN,  # scale columns = ceil(N / BLOCK)
    tiles_m,  # cdiv(M, TILE_M), used to split grid axis 0 into (expert, row tile)
    BLOCK: tl.constexpr,  # quantization block size B
    TILE_M: tl.constexpr,  # rows per program
    TILE_N: tl.constexpr,  # columns per program
    ONE_SCALE: tl.constexpr,  # the tile lies inside one scale block, so load one scalar scale
    OUT_KIND: tl.constexpr,  # 0 = float32, 1 = bfloat16, 2 = float16
):
    # Experts are folded into axis 0 because its limit is 2^31 - 1, while axis 1 allows only 65535.
    pid0 = tl.program_id(axis=0)
    expert = pid0 // tiles_m
    row0 = (pid0 % tiles_m) * TILE_M
    col0 = tl.program_id(axis=1) * TILE_N
    rows = row0 + tl.arange(0, TILE_M)
    cols = col0 + tl.arange(0, TILE_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)  # ragged edges when M or N % TILE != 0
    # Use int64 offsets: stacked experts (e.g. 256 x 2048 x 7168) have more than 2^31 elements.
    offs = expert.to(tl.int64) * M * N + rows[:, None].to(tl.int64) * N + cols[None, :]
    s_base = s_ptr + expert.to(tl.int64) * SM * SN

    # Decode e4m3fn: sign bit 7, exponent bits 6..3 (bias 7), mantissa bits 2..0, and no inf.
    b = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32)
    sign = (b & 0x80) << 24
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = sign | ((exp + 120) << 23) | (man << 20)  # rebias 7 -> 127, mantissa 3 -> 23 bits
    subnormal = sign | (man.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m * 2^-9
    is_nan = (b & 0x7F) == 0x7F  # 0x7F and 0xFF are the only NaN codes
    nan_bits = sign | 0x7FF00000  # torch's decoded NaN, which x86 multiplies carry through
    w = tl.where(exp == 0, subnormal, normal)
    w = tl.where(is_nan, nan_bits, w).to(tl.float32, bitcast=True)

    if ONE_SCALE:
        s = tl.load(s_base + (row0 // BLOCK) * SN + col0 // BLOCK)
    else:  # the block size has no power-of-two factor of 16 or more: gather a scale per element
        s_offs = (rows[:, None] // BLOCK) * SN + cols[None, :] // BLOCK
        s = tl.load(s_base + s_offs, mask=mask, other=0.0)

    # Give NaN products the bits an x86 multiply gives, because GPUs return one canonical NaN
    # instead. 0 * inf gives the x86 default NaN 0xFFC00000. A NaN operand is returned
    # quieted, and the scale's wins when both are NaN (torch itself is inconsistent there).
    p = (w * s).to(tl.uint32, bitcast=True)
    s_bits = s.to(tl.uint32, bitcast=True)
    p = tl.where((p & 0x7FFFFFFF) > 0x7F800000, 0xFFC00000, p)
    p = tl.where(is_nan, nan_bits, p)
    p = tl.where((s_bits & 0x7FFFFFFF) > 0x7F800000, s_bits | 0x400000, p)
    if OUT_KIND == 0:
        tl.store(out_ptr + offs, p.to(tl.float32, bitcast=True), mask=mask)
    elif OUT_KIND == 1:
        # Round to nearest-even on the bits. The carry handles overflow to inf and subnormals.
        r = (p + 0x7FFF + ((p >> 16) & 1)) >> 16
        r = tl.where((p & 0x7FFFFFFF) > 0x7F800000, _BF16_NAN, r)
        tl.store(out_ptr + offs, r.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, _f32_bits_to_f16_bits(p).to(tl.int16), mask=mask)


def _validate(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> None:
    if not isinstance(weight, torch.Tensor) or not isinstance(scale_inv, torch.Tensor):
        raise TypeError(f"weight and scale_inv must be torch.Tensor, got {type(weight).__name__} "
                        f"and {type(scale_inv).__name__}")
    if weight.dtype == torch.float8_e5m2:
        raise TypeError("weight dtype torch.float8_e5m2 is not supported: only e4m3fn block scales "
                        "(torch.float8_e4m3fn, or its torch.uint8 byte view) are supported by this kernel")
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"weight must be torch.float8_e4m3fn (or a torch.uint8 view of it), got {weight.dtype}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"scale_inv must be torch.float32, got {scale_inv.dtype}")
    if out_dtype not in _OUT_KIND:
        raise TypeError(f"out_dtype must be one of torch.bfloat16, torch.float16, torch.float32, got {out_dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be 2-D [M, N] or 3-D [E, M, N], "
                         f"got {weight.dim()}-D shape {tuple(weight.shape)}")
    *lead, m, n = weight.shape
    expected = (*lead, triton.cdiv(m, block_size), triton.cdiv(n, block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape mismatch for weight {tuple(weight.shape)} and block_size "
                         f"{block_size}: expected {expected}, got {tuple(scale_inv.shape)}")
    if not weight.is_contiguous() or not scale_inv.is_contiguous():
        which = "weight" if not weight.is_contiguous() else "scale_inv"
        raise ValueError(f"{which} must be contiguous (call .contiguous() first)")
    if weight.device != scale_inv.device:
        raise ValueError(f"weight and scale_inv must be on the same device, got {weight.device} and {scale_inv.device}")


def triton_weight_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: int = 128,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize block-scaled e4m3fn ``weight`` ([M, N] or [E, M, N]) with the Triton kernel.

    CPU tensors need ``TRITON_INTERPRET=1`` set before triton is imported.
    """
    _validate(weight, scale_inv, block_size, out_dtype)
    # Triton chooses the interpreter when the kernel is decorated, so check the decorated object.
    if weight.device.type == "cpu" and not isinstance(_fp8_block_dequant_kernel, InterpretedFunction):
        raise RuntimeError("weight is on the CPU, but Triton kernels need a GPU there; set TRITON_INTERPRET=1 "
                           "before importing triton, or use torch_reference_dequant")
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    if weight.numel() == 0:
        return out
    experts = weight.shape[0] if weight.dim() == 3 else 1
    m, n = weight.shape[-2:]
    # A tile must not cross a scale block, so its sides must divide B. Use B's largest
    # power-of-two factor (tl.arange needs powers of two), capped at 64 x 128 so that a GPU
    # program has about 32 elements per thread with 8 warps.
    pow2 = block_size & -block_size
    one_scale = pow2 >= 16
    tile_m, tile_n = (min(64, pow2), min(128, pow2)) if one_scale else (32, 64)
    tiles_m = triton.cdiv(m, tile_m)
    grid = (experts * tiles_m, triton.cdiv(n, tile_n))
    _fp8_block_dequant_kernel[grid](
        weight.view(torch.uint8), scale_inv,
        out if out_dtype == torch.float32 else out.view(torch.int16),
        m, n, scale_inv.shape[-2], scale_inv.shape[-1], tiles_m,
        BLOCK=block_size, TILE_M=tile_m, TILE_N=tile_n, ONE_SCALE=one_scale,
        OUT_KIND=_OUT_KIND[out_dtype], num_warps=8,
    )
    return out


def torch_reference_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Naive PyTorch definition of the same operation: expand the scales, multiply in fp32, cast."""
    _validate(weight, scale_inv, block_size, out_dtype)
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    m, n = weight.shape[-2:]
    scale = scale_inv.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    scale = scale[..., :m, :n]  # drop the part of the ragged last block that lies outside the weight
    return (weight.to(torch.float32) * scale).to(out_dtype)

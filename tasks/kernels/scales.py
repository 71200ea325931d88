"""Scale tensors of every dtype the quantized formats ship, as the float32 the kernels multiply by.

Block-scale FP8 (`weight_scale_inv`) comes with float32 scales (DeepSeek-V3), bfloat16 scales
(Qwen3 / GLM FP8 releases) or power-of-two E8M0 scales (`ue8m0`, DeepSeek-V3.1 onwards). All
three widen to float32 exactly, so one float32 multiply per element gives
`bf16(float32(w) × float32(s))` for each of them, with the kernels that already exist.

E8M0 (OCP MX): 8 exponent bits, bias 127, no sign, no mantissa. Code 0 is 2^-127 (a float32
subnormal, kept, not flushed), 254 is 2^127, 255 is NaN. torch widens 255 to the float32 bits
0x7F800001 (a signalling NaN); a multiply quiets it, so every product with that scale is NaN.
"""
from __future__ import annotations

import torch

# safetensors dtype names a caller may pass for raw uint8 scale bytes
_RAW_SCALE_DTYPES = {"F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3": torch.float8_e4m3fn}
BLOCK_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e8m0fnu)


def scale_dtype_of(scale: torch.Tensor, scale_dtype: str | None = None, name: str = "scale") -> torch.dtype:
    """The dtype `scale` holds: its own, or `scale_dtype` for raw uint8 bytes ("F8_E8M0")."""
    if scale_dtype is None:
        if scale.dtype == torch.uint8:
            raise ValueError(f"{name} is raw uint8: pass scale_dtype='F8_E8M0' (or 'F8_E4M3') to say what it holds")
        return scale.dtype
    if scale_dtype not in _RAW_SCALE_DTYPES:
        raise ValueError(f"{name}: scale_dtype must be one of {', '.join(_RAW_SCALE_DTYPES)}, got {scale_dtype!r}")
    want = _RAW_SCALE_DTYPES[scale_dtype]
    if scale.dtype not in (torch.uint8, want):
        raise ValueError(f"{name}: scale_dtype={scale_dtype!r} needs uint8 (or {want}) bytes, got {scale.dtype}")
    return want


def block_scale_float32(scale: torch.Tensor, scale_dtype: str | None = None, name: str = "scale") -> torch.Tensor:
    """`scale` (float32, bfloat16, float8_e8m0fnu, or uint8 with scale_dtype='F8_E8M0') as exact float32."""
    dtype = scale_dtype_of(scale, scale_dtype, name)
    if dtype not in BLOCK_SCALE_DTYPES:
        raise ValueError(f"{name}: block scales must be float32, bfloat16 or float8_e8m0fnu (F32, BF16, "
                         f"F8_E8M0), got {dtype}")
    if scale.dtype == torch.uint8:
        scale = scale.view(dtype)
    return scale if scale.dtype == torch.float32 else scale.to(torch.float32)

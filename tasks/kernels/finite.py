"""Scale values that would fake data, and inf/NaN in what dequant writes: read on the bits, numpy only.

Every format ckptflow dequantizes derives a scale from a block's absolute maximum, and the
producers floor it above zero (compressed-tensors turns a zero FP8 scale into 0.125 and clamps
float ones at eps, ModelOpt sets a zero block scale to 1.0). So a scale that is zero, negative
or non-finite is damage, not data: it turns finite codes into zeros, flipped signs or inf/NaN.
Classifying the raw bits (sign, exponent all ones, magnitude zero) needs no torch, so the
preflight check runs before torch is imported, and costs a few instructions per scale value.
"""
from __future__ import annotations

import numpy as np

BF16_MAX = 3.3895313892515355e38
F16_MAX = 65504.0

# safetensors dtype → (bits dtype, sign bit, magnitude mask, what marks inf/NaN, exponent-only check)
# E4M3 ("fn") has no inf: only magnitude 0x7F is NaN. E8M0 has no sign and no zero: 0xFF is NaN.
# gpt-oss MXFP4 ships its E8M0 scales as U8.
_BITS: dict[str, tuple[type, int, int, int, bool]] = {
    "F32": (np.uint32, 0x8000_0000, 0x7FFF_FFFF, 0x7F80_0000, True),
    "BF16": (np.uint16, 0x8000, 0x7FFF, 0x7F80, True),
    "F16": (np.uint16, 0x8000, 0x7FFF, 0x7C00, True),
    "F8_E4M3": (np.uint8, 0x80, 0x7F, 0x7F, False),
    "F8_E5M2": (np.uint8, 0x80, 0x7F, 0x7C, True),
    "F8_E8M0": (np.uint8, 0, 0xFF, 0xFF, False),
    "U8": (np.uint8, 0, 0xFF, 0xFF, False),
}


def _bits(dtype: str, raw: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if dtype not in _BITS:
        raise ValueError(f"no bit layout for scale dtype {dtype}")
    return np.frombuffer(raw, dtype=_BITS[dtype][0]) if not isinstance(raw, np.ndarray) \
        else raw.reshape(-1).view(_BITS[dtype][0])


def _nonfinite_mask(dtype: str, bits: np.ndarray) -> np.ndarray:
    _, _, mag, special, exponent_only = _BITS[dtype]
    return (bits & special) == special if exponent_only else (bits & mag) == special


def bad_scales(dtype: str, raw: bytes | bytearray | memoryview | np.ndarray) -> str | None:
    """None when every scale value is finite and > 0; else what is wrong, e.g.
    "holds 2 NaN/inf and 1 zero of its 24 value(s) (the first at flat index 5)"."""
    bits = _bits(dtype, raw)
    if bits.size == 0:
        return None
    _, sign, mag, _, _ = _BITS[dtype]
    nonfinite = _nonfinite_mask(dtype, bits)
    zero = (bits & mag) == 0 if dtype not in ("F8_E8M0", "U8") else np.zeros(bits.shape, bool)
    negative = ((bits & sign) != 0) & ~zero & ~nonfinite if sign else np.zeros(bits.shape, bool)
    bad = nonfinite | zero | negative
    if not bad.any():
        return None
    parts = [f"{int(n)} {what}" for n, what in ((np.count_nonzero(nonfinite), "NaN/inf"),
                                                (np.count_nonzero(zero), "zero"),
                                                (np.count_nonzero(negative), "negative")) if n]
    first = int(np.argmax(bad))
    return f"holds {' and '.join(parts)} of its {bits.size} value(s) (the first at flat index {first})"


def nonfinite_codes(dtype: str, raw: np.ndarray) -> int:
    """How many of `raw`'s FP8 codes are NaN/inf themselves (their output is, whatever the scale)."""
    return int(np.count_nonzero(_nonfinite_mask(dtype, _bits(dtype, raw))))


def nonfinite_bf16(out: np.ndarray) -> int:
    """How many BF16 values in `out` (any integer or byte view of them) are inf or NaN."""
    return nonfinite_codes("BF16", np.ascontiguousarray(out))


def max_abs(dtype: str, raw: bytes | bytearray | memoryview | np.ndarray) -> float:
    """The largest |value| of scale bytes `raw` as a Python float (inf when any is inf/NaN)."""
    bits = _bits(dtype, raw)
    if bits.size == 0:
        return 0.0
    if _nonfinite_mask(dtype, bits).any():
        return float("inf")
    mag = bits & _BITS[dtype][2]
    top = int(mag.max())
    if dtype == "F32":
        return float(np.array([top], np.uint32).view(np.float32)[0])
    if dtype == "BF16":
        return float(np.array([top << 16], np.uint32).view(np.float32)[0])
    if dtype == "F16":
        return float(np.array([top], np.uint16).view(np.float16)[0])
    if dtype in ("F8_E8M0", "U8"):
        return 2.0 ** (top - 127)
    if dtype == "F8_E4M3":  # 4 exponent bits (bias 7), 3 mantissa bits; exponent 0: subnormal
        exp, man = top >> 3, top & 7
        return (man / 8) * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    raise ValueError(f"no magnitude rule for scale dtype {dtype}")


def may_overflow(bound: float, limit: float = BF16_MAX) -> bool:
    """Could a product bounded by `bound` round to inf at `limit`? (NaN bounds say yes.) The 1%
    margin covers round-to-nearest at the top of the range; a false yes only costs a count."""
    return not bound < 0.99 * limit

"""What every weight quantizer shares: the rounding modes, input checks, and amax as compressed-tensors takes it.

Reference versions: compressed-tensors 0.19.0 and llm-compressor 0.14.0.1 (the pair `model_free_ptq`
runs). Paths below are relative to their packages.

amax. llm-compressor's weight observer (`observers/min_max.py:_get_min_max`) takes `torch.amin` and
`torch.amax` over each scale's elements, in the weight's dtype; compressed-tensors then clamps
`min <= 0 <= max` and takes `max(|min|, |max|)` (`quantization/utils/helpers.py:calculate_qparams`,
and `generate_gparam` for the NVFP4 global scale). `signed_amax` does the same op for op: two
reductions, no |w| copy, and a NaN anywhere makes the amax NaN (callers refuse it).
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch

from ckptflow.tasks.kernels.lut import parallel_rows

Rounding = Literal["fp32", "llmcompressor-cpu"]
ROUNDINGS: tuple[str, ...] = ("fp32", "llmcompressor-cpu")
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def check_weight(w: torch.Tensor, what: str) -> None:
    """A 2-D floating weight (or a row slice of one) in a dtype compressed-tensors quantizes."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{what} needs a 2-D weight, got shape {list(getattr(w, 'shape', []))}")
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what} needs a bfloat16, float16 or float32 weight, got {w.dtype}")


def check_finite(amax: torch.Tensor, what: str) -> None:
    """A NaN or inf anywhere in a weight makes its amax non-finite; the scales would be NaN/inf."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{what}: the weight holds NaN or inf values; it cannot be quantized")


def signed_amax(w: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """max(|min(w, 0)|, max(w, 0)) over `dim` (all when None), in w.dtype, as compressed-tensors."""
    if dim is not None:
        # per block/group: |w| then one reduction is ~2x faster than amin + amax over short inner dims,
        # and equal (abs is exact; max(|min(w,0)|, max(w,0)) is max |w|; a NaN stays NaN)
        # and on the bits (sign cleared: integer order is |w|'s order, NaN above inf; see tensor_amax)
        # it is ~4x faster again than abs() on bfloat16, whose abs and max are not vectorized here
        ints, mask = _MAGNITUDE_BITS[w.dtype]
        return w.view(ints).bitwise_and(mask).amax(dim=dim).view(w.dtype)
    lo, hi = torch.aminmax(w)
    lo = torch.clamp(lo, max=0)
    hi = torch.clamp(hi, min=0)
    return torch.maximum(lo.abs(), hi.abs())


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    """The whole weight's (or row slice's) amax, 0-d in w.dtype. Fold slices with torch.maximum:
    max is exact, so the fold equals the amax of the whole tensor."""
    check_weight(w, "tensor_amax")
    if w.numel() == 0:
        return torch.zeros((), dtype=w.dtype)
    # On the bits, not with torch.aminmax (10x slower on bfloat16 here): with the sign bit cleared,
    # the integer order of the bits is the order of |w|, inf above every finite value and every NaN
    # above inf; so the largest masked bits are max |w| exactly (= signed_amax's value; -0.0 → 0.0)
    # and a NaN anywhere gives a NaN, as there. Spans keep numpy's temporary in cache.
    ints, mask = _MAGNITUDE_BITS[w.dtype]
    bits = w.contiguous().view(ints).numpy().reshape(-1)
    top = max(int(np.bitwise_and(bits[a:a + _AMAX_SPAN], mask).max()) for a in range(0, bits.size, _AMAX_SPAN))
    return torch.tensor(top, dtype=ints).view(w.dtype)


_MAGNITUDE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
                   torch.float32: (torch.int32, 0x7FFFFFFF)}
_AMAX_SPAN = 1 << 18


def pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """w zero-padded to multiples of `block` in both dims, as compressed-tensors pads FP8_BLOCK weights
    (`quantization/utils/helpers.py:maybe_pad_tensor_for_block_quant`): zeros change no amax (it is
    clamped to include 0) and quantize to code 0; the padding is cut off again after quantizing."""
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    if pr or pc:
        w = torch.nn.functional.pad(w, (0, pc, 0, pr))
    return w


def block_view(w: torch.Tensor, block: int) -> torch.Tensor:
    """A padded [R, C] weight as [R/block, block, C/block, block] (a view when w is contiguous)."""
    rows, cols = w.shape
    return w.reshape(rows // block, block, cols // block, block)


def block_amax(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Per block×block tile amax, [ceil(r/block), ceil(c/block)] in w.dtype; ragged edge tiles take
    the elements they have (the zero padding compressed-tensors adds does not change them)."""
    check_weight(w, "block_amax")
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    rows, cols = w.shape
    if w.numel() == 0:
        return torch.zeros((-(-rows // block), -(-cols // block)), dtype=w.dtype)
    return signed_amax(block_view(pad_to_blocks(w, block), block), dim=(1, 3))


CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32 temporaries: in cache, reused by malloc


def for_row_chunks(rows: int, cols: int, work: Callable[[int, int], None], rows_per_step: int = 0) -> None:
    """Call work(a, b) over row spans of about CHUNK_ELEMENTS elements (or `rows_per_step` rows) on
    the kernels' thread pool. Small spans keep every temporary in cache and in malloc's reused heap
    (a whole-weight float32 temporary costs more in page faults than the arithmetic)."""
    step = rows_per_step or max(1, CHUNK_ELEMENTS // max(cols, 1))
    parallel_rows(rows, cols, work, max_step=step)

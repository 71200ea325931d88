"""How a block-scale tensor lines up with its FP8 weight: shape arithmetic only, no torch."""
from __future__ import annotations

import math


def normalise_scale(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                    block: tuple[int, int], name: str = "weight") -> tuple[int, int]:
    """The (bm, bn) block that maps `scale_shape` onto `weight_shape`, or a ValueError saying why not.

    A per-tensor scale (shape (), (1,) or all ones) becomes one block covering each matrix.
    """
    if len(weight_shape) not in (2, 3):
        raise ValueError(f"{name}: FP8 block dequant needs a 2-D or 3-D weight, got shape {list(weight_shape)}")
    rows, cols = weight_shape[-2:]
    if math.prod(scale_shape) == 1 and len(scale_shape) <= len(weight_shape):
        return max(rows, 1), max(cols, 1)
    bm, bn = block
    want = tuple(weight_shape[:-2]) + (-(-rows // bm), -(-cols // bn))
    if tuple(scale_shape) != want:
        raise ValueError(f"{name}: scale shape {list(scale_shape)} does not match weight "
                         f"{list(weight_shape)} with {bm}×{bn} blocks (expected {list(want)})")
    return bm, bn

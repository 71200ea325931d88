"""The arithmetic of a cut: which part of a tensor a composed (sliced) output takes. Pure.

A composed output tensor keeps its upstream transform and sources and adds two params: `cut` =
(dim, start, stop), the slice the downstream stage takes, and `full_shape`, the shape the
upstream transform makes (`tasks.plan.compose`). Here: reading those params back, and the
whole-block region a block-wise transform computes around a cut. No numpy, no torch: the
transform registry counts the bytes a cut reads from this at planning time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for hints: the plan model imports the registry, which imports this
    from ckptflow.tasks.plan.model import OutputTensor

Cut = tuple[int, int, int]


def cut_of(t: OutputTensor) -> Cut | None:
    cut = t.param("cut")
    return None if cut is None else (int(cut[0]), int(cut[1]), int(cut[2]))


def uncut(t: OutputTensor) -> OutputTensor:
    """The upstream tensor, whole: what the transform makes before the cut."""
    params = tuple((k, v) for k, v in t.params if k not in ("cut", "full_shape"))
    return replace(t, shape=tuple(t.param("full_shape")), params=params)


def view3(shape: tuple[int, ...], dim: int, item: int) -> tuple[int, int, int]:
    """`shape` seen as [outer, shape[dim], inner bytes]: a cut keeps [start, stop) of the middle."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]) * item


@dataclass(frozen=True)
class BlockRegion:
    """What a block-wise transform of a [..., rows, cols] tensor computes for a cut: which
    matrices, and the whole-block row and column span around the slice, then what to keep.

    Leading dims flatten to matrices (a cut there picks matrices); rows and columns widen to
    block edges (`block` = (bm, bn)); `keep_rows`/`keep_cols` are the slice inside that span."""

    mats: tuple[int, ...]
    rows: tuple[int, int]
    cols: tuple[int, int]
    keep_rows: tuple[int, int]
    keep_cols: tuple[int, int]

    @classmethod
    def of(cls, shape: tuple[int, ...], block: tuple[int, int], cut: Cut | None) -> "BlockRegion":
        rows, cols = shape[-2:]
        lead = shape[:-2]
        n_mats = math.prod(lead)
        mats, keep_r, keep_c = tuple(range(n_mats)), (0, rows), (0, cols)
        if cut is not None:
            dim, start, stop = cut
            dim = dim % len(shape)
            if dim == len(shape) - 2:
                keep_r = (start, stop)
            elif dim == len(shape) - 1:
                keep_c = (start, stop)
            else:  # a leading dim: whole matrices, [start, stop) of dim `dim` in each outer index
                outer, size, inner = view3(lead, dim, 1)
                mats = tuple(o * size * inner + k for o in range(outer) for k in range(start * inner, stop * inner))
        bm, bn = block
        span_r = (keep_r[0] // bm * bm, min(rows, -(-keep_r[1] // bm) * bm))
        span_c = (keep_c[0] // bn * bn, min(cols, -(-keep_c[1] // bn) * bn))
        return cls(mats, span_r, span_c, keep_r, keep_c)

    def row_chunks(self, step: int) -> list[tuple[int, int, int]]:
        """(matrix, r0, r1): spans of whole block rows (`step` a multiple of bm) covering `rows`."""
        r_lo, r_hi = self.rows
        return [(e, r, min(r + step, r_hi)) for e in self.mats for r in range(r_lo, r_hi, step)]

    def trim(self, r0: int, r1: int) -> tuple[slice, slice] | None:
        """Rows and columns of a computed chunk [r0, r1) × `cols` to keep; None = keep it all."""
        a, b = max(r0, self.keep_rows[0]), min(r1, self.keep_rows[1])
        c = (self.keep_cols[0] - self.cols[0], self.keep_cols[1] - self.cols[0])
        if (a, b) == (r0, r1) and c == (0, self.cols[1] - self.cols[0]):
            return None
        return slice(a - r0, b - r0), slice(*c)

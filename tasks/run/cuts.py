"""Slices of transformed tensors, so a chain of per-tensor stages (dequant → MP) is one pass.

A composed output tensor keeps its upstream transform and sources and adds two params:
`cut` = (dim, start, stop), the slice the downstream stage takes, and `full_shape`, the shape
the upstream transform makes. Three ways to produce the slice, cheapest first:
- the transform reads only the bytes the slice needs (copy, cast: slicing commutes with an
  element-wise op) — `source_cut`;
- a block-wise transform (FP8 dequant, any row/column-blocked format) works on whole blocks
  covering the slice and cuts them — `BlockRegion`;
- any other transform makes the whole tensor as a stream and `cut_stream` keeps the slice.
Each gives the bytes `slice(transform(x))` would, so a fused pass equals the two passes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ckptflow.tasks.plan.model import OutputTensor, SourceRef

Release = Callable[[], None]
Piece = tuple[Any, Release | None]
Cut = tuple[int, int, int]


def cut_of(t: OutputTensor) -> Cut | None:
    cut = t.param("cut")
    return None if cut is None else (int(cut[0]), int(cut[1]), int(cut[2]))


def uncut(t: OutputTensor) -> OutputTensor:
    """The upstream tensor, whole: what the transform makes before the cut."""
    params = tuple((k, v) for k, v in t.params if k not in ("cut", "full_shape"))
    return replace(t, shape=tuple(t.param("full_shape")), params=params)


def read_bytes(t: OutputTensor) -> int:
    """Bytes of its sources `t`'s transform reads: every source whole, except the sliced one of a
    cut, which costs only what the cut needs (the slice for copy, cast and slice; the whole blocks
    around it for a block-wise FP8 dequant). What runs and dry runs report as read."""
    total = sum(s.end - s.start for s in t.sources)
    cut = (int(t.param("dim")), int(t.param("start")), int(t.param("stop"))) if t.transform == "slice" \
        else cut_of(t)
    if cut is None or not t.sources or t.transform not in ("copy", "cast", "slice", "dequant_fp8"):
        return total
    src = t.sources[0]
    whole, n = src.end - src.start, math.prod(src.shape)
    if t.transform != "dequant_fp8":
        dim, start, stop = cut
        return total - whole + whole // src.shape[dim] * (stop - start)
    region = BlockRegion.of(src.shape, tuple(t.param("block")), cut)
    kept = len(region.mats) * (region.rows[1] - region.rows[0]) * (region.cols[1] - region.cols[0])
    return total - whole + whole // max(n, 1) * kept


def view3(shape: tuple[int, ...], dim: int, item: int) -> tuple[int, int, int]:
    """`shape` seen as [outer, shape[dim], inner bytes]: a cut keeps [start, stop) of the middle."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]) * item


def source_cut(read_ahead: Callable[..., Iterator[Piece]], src: SourceRef, cut: Cut, item: int,
               chunk: int) -> Iterator[Piece]:
    """Raw bytes of `src[..., start:stop, ...]` along `dim` (any dtype, no decode), in pieces of
    whole elements. Outer extent 1 (dim 0): range reads; otherwise whole outer rows a chunk at a
    time, of which the reader keeps only the wanted columns (`read_ahead(file, ranges, columns)`)."""
    dim, start, stop = cut
    outer, size, inner = view3(src.shape, dim, item)
    if outer == 1:
        a, b = src.start + start * inner, src.start + stop * inner
        step = max(1, chunk // item) * item
        yield from read_ahead(src.file, [(x, min(x + step, b)) for x in range(a, b, step)])
        return
    row = size * inner
    rows_per = max(1, chunk // max(row, 1))
    ranges = [(src.start + o0 * row, src.start + min(o0 + rows_per, outer) * row) for o0 in range(0, outer, rows_per)]
    yield from read_ahead(src.file, ranges, (row, start * inner, stop * inner))


def cut_stream(pieces: Iterator[Piece], full_shape: tuple[int, ...], item: int, cut: Cut,
               take: Callable[[int], Any], give: Callable[[Any], Release]) -> Iterator[Piece]:
    """Keep `[..., start:stop, ...]` of a whole tensor's row-major byte stream, pieces of any size.

    The fallback for transforms that cannot make a region: correct for all of them, but the
    whole tensor is computed. Whole rows inside a piece are cut with one numpy copy; a row split
    over two pieces is handled at the edges, so memory stays at one piece."""
    dim, start, stop = cut
    _, size, inner = view3(full_shape, dim, item)
    row, lo, hi = size * inner, start * inner, stop * inner
    pos = 0
    for raw, release in pieces:
        data = np.frombuffer(raw, dtype=np.uint8)
        n = len(data)
        out = take(max(1, n))  # a cut never yields more than it reads
        got = 0

        def keep(a: int, b: int) -> None:  # stream bytes [a, b) inside this row: keep their overlap
            nonlocal got
            r0 = (a // row) * row
            x, y = max(a, r0 + lo), min(b, r0 + hi)
            if x < y:
                out[got: got + y - x] = data[x - pos: y - pos]
                got += y - x

        end = pos + n
        first_whole = -(-pos // row) * row
        last_whole = (end // row) * row
        if first_whole >= last_whole:  # no whole row inside: one or two partial rows
            a = pos
            while a < end:
                b = min(end, (a // row + 1) * row)
                keep(a, b)
                a = b
        else:
            if pos < first_whole:
                keep(pos, first_whole)
            k = (last_whole - first_whole) // row
            rows = data[first_whole - pos: last_whole - pos].reshape(k, row)
            out[got: got + k * (hi - lo)].reshape(k, hi - lo)[:] = rows[:, lo:hi]
            got += k * (hi - lo)
            if last_whole < end:
                keep(last_whole, end)
        if release is not None:
            release()
        pos = end
        if got:
            yield memoryview(out[:got]), give(out)
        else:
            give(out)()


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

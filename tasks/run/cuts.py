"""Slices of transformed tensors, so a chain of per-tensor stages (dequant → MP) is one pass.

A composed output tensor keeps its upstream transform and sources and adds two params:
`cut` = (dim, start, stop), the slice the downstream stage takes, and `full_shape`, the shape
the upstream transform makes. Three ways to produce the slice, cheapest first:
- the transform reads only the bytes the slice needs (copy, cast: slicing commutes with an
  element-wise op) — `source_cut`;
- a block-wise transform (FP8 dequant, any row/column-blocked format) works on whole blocks
  covering the slice and cuts them — `regions.BlockRegion`;
- any other transform makes the whole tensor as a stream and `cut_stream` keeps the slice.
Each gives the bytes `slice(transform(x))` would, so a fused pass equals the two passes. Which
way a transform takes is its registry entry's `cuts_itself`; what it reads, its `reads`
(`tasks.plan.transforms`); the cut arithmetic is pure and lives in `tasks.plan.regions`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ckptflow.tasks.plan.model import SourceRef
from ckptflow.tasks.plan.regions import Cut, view3

Release = Callable[[], None]
Piece = tuple[Any, Release | None]


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

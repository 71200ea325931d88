"""Which bytes of which chunk a region of a global tensor needs. Pure: no numpy, no torch.

A region fixes the stacked leading indices (`lead`) and takes global rows [g0, g1) of the next
dim, whole in every trailing dim. A chunk is C-contiguous, so with its leading indices fixed its
rows are one contiguous byte run: a region reads, per chunk it touches, exactly one range, and
never a byte it does not keep (trailing dims split across TP ranks come from several chunks).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from ckptflow.storage.safetensors_format import DTYPE_SIZES

if TYPE_CHECKING:
    from ckptflow.tasks.plan.model import OutputTensor


class ChunkRead(NamedTuple):
    source: int   # index into the output tensor's sources
    start: int    # absolute byte range in the source's file
    end: int
    r0: int       # the global rows it holds: [r0, r1)
    r1: int


def holds(lead: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """Does a chunk at `offsets` of `sizes` hold the stacked indices `lead`?"""
    return all(o <= i < o + s for i, o, s in zip(lead, offsets, sizes))


def read_of(lead: tuple[int, ...], g0: int, g1: int, offsets: tuple[int, ...], sizes: tuple[int, ...],
            byte_offset: int, item: int) -> tuple[int, int, int, int] | None:
    """(start, end, r0, r1): the bytes of a chunk holding rows [r0, r1) of [g0, g1) at `lead`, or None."""
    n = len(lead)
    if not holds(lead, offsets, sizes):
        return None
    r0, r1 = max(g0, offsets[n]), min(g1, offsets[n] + sizes[n])
    if r1 <= r0:
        return None
    row_bytes = math.prod(sizes[n + 1:]) * item
    lin = 0
    for i in range(n):  # the chunk-local position of the fixed leading indices
        lin = lin * sizes[i] + (lead[i] - offsets[i])
    first = lin * sizes[n] + (r0 - offsets[n])
    return byte_offset + first * row_bytes, byte_offset + (first + r1 - r0) * row_bytes, r0, r1


def pieces(t: OutputTensor, max_bytes: int) -> list[tuple[int, int]]:
    """Global row spans [g0, g1) of `t`'s row ranges, in output order, each at most `max_bytes`
    of output (one row at least): the assembly buffer is never bigger."""
    row_bytes = max(1, math.prod(t.shape[1:]) * DTYPE_SIZES[t.dtype])
    step = max(1, max_bytes // row_bytes)
    return [(g, min(g + step, b)) for a, b in t.param("rows") for g in range(a, b, step)]


def reads(t: OutputTensor, g0: int, g1: int) -> list[ChunkRead]:
    """The chunk reads making rows [g0, g1) of `t`, one per chunk touched."""
    lead, item = tuple(t.param("lead")), DTYPE_SIZES[t.dtype]
    out = []
    for i, (src, offsets) in enumerate(zip(t.sources, t.param("offsets"))):
        got = read_of(lead, g0, g1, tuple(offsets), src.shape, src.start, item)
        if got is not None:
            out.append(ChunkRead(i, *got))
    return out


def region_read_bytes(t: OutputTensor) -> int:
    """What assembling `t` reads: exactly its own bytes when the chunks tile the tensor."""
    return sum(r.end - r.start for a, b in t.param("rows") for r in reads(t, a, b))

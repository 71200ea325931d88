"""Which byte ranges of which chunks build a block of a global tensor: pure planning, no I/O.

A block (`region`: one (start, stop) per dim, e.g. layer i, rows a:b of a stacked weight) is
laid out C-contiguous in its own buffer. Each chunk it meets gives byte ranges of the chunk's
file and where they go in that buffer; a run is as long as both layouts allow (consecutive
rows of a full-width block are one range).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckptflow.tasks.mcore.dcp_metadata import ITEMSIZE
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor

Region = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Piece:
    chunk: ChunkRef
    ranges: tuple[tuple[int, int, int], ...]  # (file byte start, file byte end, byte offset in the block)


def full_region(tensor: GlobalTensor) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in tensor.shape)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in region)


def chunks_for(tensor: GlobalTensor, region: Region | None = None) -> list[Piece]:
    """The pieces that build `region` of `tensor` (the whole tensor by default), in chunk order."""
    region = tuple(region) if region is not None else full_region(tensor)
    if len(region) != len(tensor.shape) or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(region, tensor.shape)):
        raise ValueError(f"{tensor.key}: region {list(region)} is not inside shape {list(tensor.shape)}")
    item = ITEMSIZE[tensor.dtype]
    rshape = region_shape(region)
    out = []
    for chunk in tensor.chunks:
        box = [(max(lo, o), min(hi, o + s)) for (lo, hi), o, s in zip(region, chunk.offsets, chunk.sizes)]
        if any(a >= b for a, b in box) or not math.prod(rshape):
            continue
        out.append(Piece(chunk, tuple(_runs(chunk, region, rshape, box, item))))
    return out


def _strides(shape: Sequence[int], item: int) -> list[int]:
    out, acc = [], item
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def _runs(chunk: ChunkRef, region: Region, rshape: tuple[int, ...], box: list[tuple[int, int]], item: int):
    nd = len(box)
    if nd == 0:
        yield (chunk.byte_offset, chunk.byte_offset + item, 0)
        return
    src_st, dst_st = _strides(chunk.sizes, item), _strides(rshape, item)
    # Dims k+1.. are spanned whole by the box in both the chunk and the block, so dims k.. are one
    # run of consecutive bytes in both layouts (dim k may be cut).
    k = nd - 1
    while k > 0 and box[k] == (chunk.offsets[k], chunk.offsets[k] + chunk.sizes[k]) == tuple(region[k]):
        k -= 1
    run = (box[k][1] - box[k][0]) * src_st[k]
    inner = tuple(a for a, _ in box[k:])
    last = None
    for idx in itertools.product(*(range(a, b) for a, b in box[:k])):
        coords = (*idx, *inner)
        src = chunk.byte_offset + sum((c - o) * s for c, o, s in zip(coords, chunk.offsets, src_st))
        dst = sum((c - lo) * s for c, (lo, _), s in zip(coords, region, dst_st))
        if last is not None and last[1] == src and last[2] + (last[1] - last[0]) == dst:
            last = (last[0], src + run, last[2])  # continues the previous run in both layouts
            continue
        if last is not None:
            yield last
        last = (src, src + run, dst)
    if last is not None:
        yield last

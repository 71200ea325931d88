"""Checks that a global tensor's chunks tile it exactly, and that their bytes are where they can be.

Real checkpoints cut tensors on a grid (layers × TP ranks × experts): each chunk is one cell of
the grid its own boundaries make, which is checked in O(n log n). Anything else is refused unless
small enough for a pairwise check: a reader must never assemble a tensor from overlapping or
missing pieces.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ckptflow.tasks.mcore.index import ChunkRef
from ckptflow.tasks.megatron.safe import MegatronLoadError

PAIRWISE_MAX = 2048


def tiling_problem(shape: tuple[int, ...], chunks: Sequence[ChunkRef]) -> str | None:
    """Why `chunks` do not tile a tensor of `shape` exactly (gap, overlap, outside), or None."""
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            return f"a chunk at {list(c.offsets)} of {len(c.sizes)} dims in a {len(shape)}-dim tensor"
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, shape)):
            return f"chunk at {list(c.offsets)} of size {list(c.sizes)} reaches past shape {list(shape)}"
    total = math.prod(shape)
    covered = sum(math.prod(c.sizes) for c in chunks if math.prod(c.sizes))
    if covered < total:
        return f"its chunks cover {covered} of its {total} elements (a gap: missing chunks?)"
    if covered > total:
        return f"its chunks cover {covered} elements of {total}: overlapping chunks"
    live = [c for c in chunks if math.prod(c.sizes)]
    cuts = [sorted({0, n, *(c.offsets[d] for c in live), *(c.offsets[d] + c.sizes[d] for c in live)})
            for d, n in enumerate(shape)]
    cells = set()
    on_grid = True
    for c in live:
        idx = []
        for d, cut in enumerate(cuts):
            i = _find(cut, c.offsets[d])
            if cut[i + 1] != c.offsets[d] + c.sizes[d]:
                on_grid = False
                break
            idx.append(i)
        if not on_grid:
            break
        cells.add(tuple(idx))
    if on_grid:
        return None if len(cells) == len(live) else "two chunks cover the same block: overlapping chunks"
    if len(live) > PAIRWISE_MAX:
        return f"{len(live)} chunks not on one grid; refused (at most {PAIRWISE_MAX} irregular chunks are checked)"
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                return f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap"
    return None


def _find(cut: list[int], value: int) -> int:
    import bisect

    return bisect.bisect_left(cut, value)


def check_tensor(label: str, key: str, shape: tuple[int, ...], itemsize: int, chunks: Sequence[ChunkRef],
                 file_sizes: dict[str, int]) -> None:
    """One error naming `key` unless its chunks tile it and each lies inside its file with the right length."""
    for c in chunks:
        want = math.prod(c.sizes) * itemsize
        if c.byte_length != want:
            raise MegatronLoadError(f"{label}: tensor {key!r}: chunk at {list(c.offsets)} holds {c.byte_length} "
                                    f"bytes, its shape {list(c.sizes)} needs {want}; corrupt checkpoint")
        size = file_sizes.get(c.file)
        if size is None or c.byte_offset + c.byte_length > size:
            raise MegatronLoadError(f"{label}: tensor {key!r}: chunk at {list(c.offsets)} is at bytes "
                                    f"{c.byte_offset}..{c.byte_offset + c.byte_length} of {c.file}, which "
                                    f"{'is missing' if size is None else f'has {size} bytes'}; truncated or "
                                    "incomplete checkpoint")
    problem = tiling_problem(shape, chunks)
    if problem:
        raise MegatronLoadError(f"{label}: tensor {key!r} of shape {list(shape)}: {problem}; the checkpoint "
                                "is corrupt or incomplete")

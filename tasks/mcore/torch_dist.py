"""A torch_dist checkpoint folder → global tensors of byte-range chunks, by small range reads.

`.metadata` (read whole, capped) names each model chunk's archive: file, offset, length. Each
archive's central directory is in its last bytes and the `data/0` local header near its first,
so per file the reader asks for those two small ranges of every chunk at once (`cat_ranges`:
concurrent GETs on object stores; neighbours merged into one read), parses them and keeps only
the result. Optimizer and RNG entries are never read.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from typing import Any

from ckptflow.storage.read_runs import join_ranges
from ckptflow.storage.urls import Location
from ckptflow.tasks.mcore.archive import HEAD, TAIL, ArchiveError, Member, find_payload_member, payload_offset
from ckptflow.tasks.mcore.dcp_metadata import ITEMSIZE, METADATA_CAP, DcpChunk, DcpMetadata, parse_metadata
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor
from ckptflow.tasks.mcore.tiling import check_tensor
from ckptflow.tasks.megatron.safe import MegatronLoadError

MERGE_GAP = 64 << 10     # ranges closer than this are read as one
MERGE_MAX = 8 << 20      # ... up to this size; bounds one read's memory
BATCH = 512              # merged reads in flight per cat_ranges call
LOCAL_HEADER = 30 + 1024  # a local header: fixed part, name, torch's alignment padding


def read_metadata(loc: Location) -> DcpMetadata:
    label = loc.url_of(".metadata")
    try:
        with loc.fs.open(loc.path(".metadata"), "rb") as f:
            data = f.read(METADATA_CAP + 1)
    except FileNotFoundError:
        raise MegatronLoadError(f"{label}: missing; a torch_dist checkpoint needs its .metadata "
                                "(the save did not finish?)") from None
    return parse_metadata(data, label)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a, b) for a, b, _ in join_ranges(ranges, lambda r: r, MERGE_GAP, MERGE_MAX)]


def _fetch(loc: Location, name: str, ranges: list[tuple[int, int]]) -> Iterable[tuple[int, bytes]]:
    """(start, bytes) of each merged range covering `ranges`, BATCH reads at a time."""
    merged = _merge(ranges)
    path = loc.path(name)
    if loc.is_local:  # one open file and a pread per range (fsspec's local cat_ranges opens it per range)
        with open(path, "rb") as f:
            for a, b in merged:
                blob = os.pread(f.fileno(), b - a, a)
                if len(blob) != b - a:
                    raise MegatronLoadError(f"{loc.url_of(name)}: could not read bytes {a}..{b} (short read)")
                yield a, blob
        return
    for i in range(0, len(merged), BATCH):
        part = merged[i:i + BATCH]
        blobs = loc.fs.cat_ranges([path] * len(part), [a for a, _ in part], [b for _, b in part])
        for (a, b), blob in zip(part, blobs):
            if isinstance(blob, Exception) or len(blob) != b - a:
                raise MegatronLoadError(f"{loc.url_of(name)}: could not read bytes {a}..{b} "
                                        f"({blob if isinstance(blob, Exception) else 'short read'})")
            yield a, blob


def _slice(blobs: list[tuple[int, bytes]], a: int, b: int) -> bytes | None:
    for start, blob in blobs:
        if start <= a and b <= start + len(blob):
            return blob[a - start:b - start]
    return None


def _locate_file(loc: Location, name: str, items: list[DcpChunk]) -> dict[tuple[int, int], tuple[int, int]]:
    """(item offset, length) → (absolute offset, length) of its tensor bytes, for the chunks in `name`."""
    label = loc.url_of(name)
    wanted = []
    for it in items:
        wanted.append((max(it.item_offset, it.item_offset + it.item_length - TAIL), it.item_offset + it.item_length))
        wanted.append((it.item_offset, it.item_offset + min(HEAD, it.item_length)))
    out: dict[tuple[int, int], tuple[int, int]] = {}
    later: list[tuple[DcpChunk, Member]] = []
    by_item = {(it.item_offset, it.item_length): it for it in items}
    pending = deque(sorted(by_item))
    blobs: list[tuple[int, bytes]] = []
    # Walk merged reads in file order, parsing each item as soon as its head and tail are in hand.
    for start, blob in _fetch(loc, name, wanted):
        blobs.append((start, blob))
        while pending and pending[0][0] + pending[0][1] <= start + len(blob):
            off, length = pending.popleft()
            it = by_item[(off, length)]
            tail = _slice(blobs, max(off, off + length - TAIL), off + length)
            head = _slice(blobs, off, off + min(HEAD, length))
            if tail is None or head is None:  # pragma: no cover - every item's ranges were asked for
                raise MegatronLoadError(f"{label}: internal: chunk bytes {off}..{off + length} not read")
            try:
                member = find_payload_member(tail, length)
                if min(length, member.header + LOCAL_HEADER) <= len(head):
                    out[(off, length)] = (off + payload_offset(head[member.header:], member), member.size)
                else:
                    later.append((it, member))
            except ArchiveError as exc:
                raise _archive_error(label, it, exc) from None
        # Keep only what items still to parse may need (their heads start at or after their offset).
        blobs = [(s, b) for s, b in blobs if pending and s + len(b) > pending[0][0]]
    if later:  # a big pickle pushed data/0's header past HEAD: one more small read each
        spans = [(it.item_offset + m.header, it.item_offset + min(it.item_length, m.header + LOCAL_HEADER))
                 for it, m in later]
        got = list(_fetch(loc, name, spans))
        for (it, member), (a, b) in zip(later, spans):
            try:
                at = it.item_offset + payload_offset(_slice(got, a, b) or b"", member)
                out[(it.item_offset, it.item_length)] = (at, member.size)
            except ArchiveError as exc:
                raise _archive_error(label, it, exc) from None
    return out


def _archive_error(label: str, it: DcpChunk, exc: ArchiveError) -> MegatronLoadError:
    return MegatronLoadError(f"{label}: the chunk at bytes {it.item_offset}..{it.item_offset + it.item_length} "
                             f"(global offset {list(it.offsets)}) is not a plain torch.save archive: {exc}; "
                             "corrupt or forged checkpoint")


def read_torch_dist(loc: Location, file_sizes: dict[str, int]) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
    """Every model tensor of the torch_dist checkpoint at `loc`; `file_sizes`: its .distcp files.

    Returns (tensors, Megatron's `mcore_data`)."""
    meta = read_metadata(loc)
    label = loc.url_of(".metadata")
    by_file: dict[str, list[DcpChunk]] = {}
    for t in meta.tensors.values():
        for c in t.chunks:
            size = file_sizes.get(c.file)
            if size is None or c.item_offset + c.item_length > size:
                raise MegatronLoadError(
                    f"{label}: tensor {t.key!r}: chunk at {list(c.offsets)} is said to be at bytes "
                    f"{c.item_offset}..{c.item_offset + c.item_length} of {c.file}, which "
                    f"{'is missing' if size is None else f'has {size} bytes'}; incomplete or corrupt checkpoint")
            by_file.setdefault(c.file, []).append(c)
    where: dict[tuple[str, int, int], tuple[int, int]] = {}
    for name, items in sorted(by_file.items()):
        unique = list({(c.item_offset, c.item_length): c for c in items}.values())
        for (off, length), at in _locate_file(loc, name, unique).items():
            where[(name, off, length)] = at
    out = {}
    for t in meta.tensors.values():
        item = ITEMSIZE[t.dtype]
        refs = tuple(ChunkRef(c.file, *where[(c.file, c.item_offset, c.item_length)], c.offsets, c.sizes)
                     for c in t.chunks)
        check_tensor(label, t.key, t.shape, item, refs, file_sizes)
        out[t.key] = GlobalTensor(t.key, t.dtype, t.shape, refs)
    return out, meta.mcore_data


"""Chunk archives of any size at almost no disk cost: what a torch_dist `.distcp` file holds, sparse.

DCP writes each chunk as one `torch.save` archive, back to back. The reader only ever reads an
archive's first and last few KB (the zip records that say where `data/0`'s bytes are), so a
test can write those records, exactly as torch lays them out, at the right offsets and leave the
tensor bytes as a hole (`ftruncate`): a 1.3 TB checkpoint costs ~4 KB of disk per chunk.

Layout mirrored from torch 2.x's PyTorchStreamWriter: members data.pkl, .format_version,
.storage_alignment, byteorder, data/0, version, .data/serialization_id; each member's bytes at a
64-byte-aligned archive offset (padding in an 'FB' extra field), general-purpose flag 0x808 (sizes
in a data descriptor after the bytes; the local header's are 0), stored (method 0), zip64 records
for archives of 4 GiB and more. the hole's CRC is not computed (0): no reader here checks them.
`data.pkl` is torch's own pickle of a stride-0 view with the chunk's shape and dtype.
"""
from __future__ import annotations

import collections
import functools
import io
import math
import os
import pickle
import struct
import zlib

import torch

ALIGN = 64
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
FLAGS = 0x808
_STORAGE = {torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage", torch.float16: "HalfStorage"}


class _Storage:
    """Stands for the chunk's storage in data.pkl: pickled as torch's persistent id, never as itself."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, sizes: tuple[int, ...]) -> None:
        self.storage, self.sizes = storage, sizes

    def __reduce__(self):  # what torch.Tensor.__reduce_ex__ gives for a contiguous CPU tensor
        stride = [1] * len(self.sizes)
        for d in range(len(self.sizes) - 2, -1, -1):
            stride[d] = stride[d + 1] * self.sizes[d + 1]
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, torch.Size(self.sizes), tuple(stride), False,
                                                  collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", getattr(torch, _STORAGE[obj.dtype]), "0", "cpu", obj.numel
        return None


@functools.lru_cache(maxsize=256)
def _pickle(dtype: torch.dtype, sizes: tuple[int, ...]) -> bytes:
    """torch.save's data.pkl for a contiguous CPU tensor of `sizes` (protocol 2, storage key '0')."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_Tensor(_Storage(dtype, math.prod(sizes)), sizes))
    return buf.getvalue()


def _local(name: bytes, at: int, crc: int = 0, size: int = 0) -> bytes:
    """Local header for a member whose header starts at archive offset `at`, padded so its bytes align."""
    pad = (-(at + _LOCAL.size + len(name) + 4)) % ALIGN
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB': torch's alignment padding
    return _LOCAL.pack(b"PK\x03\x04", 45, FLAGS, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def archive_parts(dtype: torch.dtype, sizes: tuple[int, ...], nbytes: int) -> tuple[bytes, int, bytes, int]:
    """(head, payload offset, tail, archive length) of a torch.save archive whose data/0 is `nbytes`
    long: head is everything before the payload, tail everything after it."""
    members = [(b"archive/data.pkl", _pickle(dtype, sizes)), (b"archive/.format_version", b"1"),
               (b"archive/.storage_alignment", b"64"), (b"archive/byteorder", b"little"),
               (b"archive/data/0", None), (b"archive/version", b"3\n"),
               (b"archive/.data/serialization_id", b"0" * 40)]
    head, tail = bytearray(), bytearray()
    entries: list[tuple[bytes, int, int, int]] = []
    pos = payload_at = 0
    for name, data in members:
        hdr = _local(name, pos)
        crc = 0 if data is None else zlib.crc32(data)
        entries.append((name, pos, nbytes if data is None else len(data), crc))
        if data is None:  # data/0: its header ends the head; its bytes are the hole
            head += hdr
            payload_at = pos + len(hdr)
            desc = struct.pack("<4sIQQ" if nbytes >= 0xFFFFFFFF else "<4sIII", b"PK\x07\x08", 0, nbytes, nbytes)
            tail += desc
            pos = payload_at + nbytes + len(desc)
            continue
        rec = hdr + data + struct.pack("<4sIII", b"PK\x07\x08", crc, len(data), len(data))
        (tail if payload_at else head).extend(rec)
        pos += len(rec)
    cd_off = pos
    cd = bytearray()
    for name, at, size, crc in entries:
        big = size >= 0xFFFFFFFF or at >= 0xFFFFFFFF
        extra = struct.pack("<HHQQQ", 1, 24, size, size, at) if big else b""
        s, o = (0xFFFFFFFF, 0xFFFFFFFF) if big else (size, at)
        cd += _CENTRAL.pack(b"PK\x01\x02", 45, 45, FLAGS, 0, 0, 0, crc, s, s, len(name), len(extra), 0, 0, 0, 0, o)
        cd += name + extra
    tail += cd
    end = cd_off + len(cd)
    if any(e[2] >= 0xFFFFFFFF for e in entries) or end >= 0xFFFFFFFF:
        tail += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, len(entries), len(entries),
                            len(cd), cd_off)
        tail += struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
        tail += _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        tail += _EOCD.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(cd), cd_off, 0)
    return bytes(head), payload_at, bytes(tail), payload_at + nbytes + len(tail)


class SparseFile:
    """One `__{rank}_0.distcp`: chunk archives appended by writing only their records."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0

    def append(self, dtype: torch.dtype, sizes: tuple[int, ...], nbytes: int) -> tuple[int, int, int]:
        """(archive offset, archive length, absolute payload offset) of a new chunk at the end."""
        head, at, tail, length = archive_parts(dtype, sizes, nbytes)
        start = self.size
        os.pwrite(self.fd, head, start)
        os.pwrite(self.fd, tail, start + at + nbytes)
        self.size += length
        return start, length, start + at

    def append_bytes(self, n: int) -> tuple[int, int]:
        """(offset, length) of a bytes item (DCP writes those raw, not as archives), left as a hole."""
        self.size += n
        return self.size - n, n

    def close(self) -> None:
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)

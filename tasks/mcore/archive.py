"""Where a chunk's tensor bytes sit inside its `torch.save` archive, from the zip's own records.

Each torch_dist chunk is a small zip (`archive/data.pkl`, `archive/data/0`, ...) written
uncompressed. Its central directory (the archive's last few hundred bytes) says where the
`data/0` member's local header is; that header (a few dozen bytes near the archive's start)
says where its bytes begin. Both are checked, never trusted: the member must be stored
(method 0), its sizes agree, and it must lie inside the archive before the directory.
Pure functions over bytes already read: the reader batches the range reads.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

TAIL = 4096   # a chunk archive's central directory: ~7 entries of ~90 bytes, EOCD, zip64 records
HEAD = 4096   # data/0's local header follows data.pkl (~200 bytes) and three tiny records
MAX_ENTRIES = 64
_EOCD, _EOCD64, _LOC64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CEN, _LOC = b"PK\x01\x02", b"PK\x03\x04"
# signature, (skip 6) method, (skip 8) compressed, uncompressed, name/extra/comment lengths, (skip 8) offset
_CEN_ENTRY = struct.Struct("<4s6xH8xIIHHH8xI")
_DATA = re.compile(r"[^/]+/data/\d+")


class ArchiveError(ValueError):
    """The archive's records are missing, inconsistent or point outside it; the text says which."""


@dataclass(frozen=True)
class Member:
    name: str
    header: int   # local header offset, relative to the archive's start
    size: int     # stored bytes (== uncompressed: method 0 checked)
    limit: int    # where the central directory starts: the member's bytes end before it


def directory(tail: bytes, archive_len: int,
              max_entries: int = MAX_ENTRIES) -> tuple[list[tuple[str, int, int]], int]:
    """([(name, local header offset, size)], directory offset) of the zip whose last `len(tail)`
    bytes are `tail`; every member a torch.save reader uses is checked to be stored uncompressed.

    Raises `NeedMore(n)` when the directory starts before `tail`: read the last n bytes instead."""
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise ArchiveError("no zip end-of-directory record at its end")
    base = archive_len - len(tail)  # archive offset of tail[0]
    _, _, _, count, cd_size, cd_off, _ = struct.unpack_from("<HHHHIIH", tail, at + 4)
    if 0xFFFFFFFF in (cd_size, cd_off) or count == 0xFFFF:
        loc = at - 20
        if loc < 0 or tail[loc:loc + 4] != _LOC64:
            raise ArchiveError("zip64 sizes without a zip64 locator")
        rec = struct.unpack_from("<Q", tail, loc + 8)[0] - base
        if rec < 0 or rec + 56 > len(tail) or tail[rec:rec + 4] != _EOCD64:
            raise ArchiveError("zip64 end-of-directory record missing or outside the archive")
        count, _, cd_size, cd_off = struct.unpack_from("<QQQQ", tail, rec + 24)
    if count > max_entries:
        raise ArchiveError(f"{count} zip entries, more than the {max_entries} expected")
    if cd_off + cd_size > archive_len:
        raise ArchiveError("its central directory lies outside its byte range")
    start = cd_off - base
    if start < 0:
        raise NeedMore(archive_len - cd_off)
    found = []
    pos = start
    for _ in range(count):
        if pos + 46 > len(tail):
            raise ArchiveError("a broken central directory entry")
        (sig, method, csize, usize, nlen, elen, clen, header) = _CEN_ENTRY.unpack_from(tail, pos)
        if sig != _CEN:
            raise ArchiveError("a broken central directory entry")
        name = tail[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
        if 0xFFFFFFFF in (usize, csize, header):
            usize, csize, header = _zip64(tail[pos + 46 + nlen:pos + 46 + nlen + elen], usize, csize, header)
        pos += 46 + nlen + elen + clen
        if method != 0 or csize != usize:
            if _DATA.fullmatch(name) or name.endswith("/data.pkl"):
                raise ArchiveError(f"member {name} is compressed (method {method}); torch.save stores "
                                   "everything uncompressed")
        if header + 30 + csize > cd_off:
            raise ArchiveError(f"member {name} claims {csize} bytes at {header}, past the central directory")
        found.append((name, header, usize))  # plain tuples: ~10^5 archives are parsed per checkpoint
    return found, cd_off


class NeedMore(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


def find_payload_member(tail: bytes, archive_len: int) -> Member:
    """The one `<name>/data/N` member of the chunk archive whose last `len(tail)` bytes are `tail`."""
    try:
        entries, limit = directory(tail, archive_len)
    except NeedMore:
        raise ArchiveError("its central directory is larger than a tensor archive's") from None
    found = [e for e in entries if _DATA.fullmatch(e[0])]
    if len(found) != 1:
        raise ArchiveError(f"{len(found)} tensor storages in the chunk archive; a chunk holds exactly one")
    return Member(*found[0], limit)


def _zip64(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field, for the fields marked 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{n // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if header == 0xFFFFFFFF and vals:
                header = vals.pop(0)
        pos += 4 + n
    return usize, csize, header


def payload_offset(head: bytes, member: Member) -> int:
    """Offset of `member`'s bytes in the archive; `head` holds the archive from `member.header` on."""
    if len(head) < 30 or head[:4] != _LOC:
        raise ArchiveError(f"member {member.name}: no local header where the directory says")
    method, csize, usize, nlen, elen = (struct.unpack_from("<H", head, 8)[0], *struct.unpack_from("<II", head, 18),
                                        *struct.unpack_from("<HH", head, 26))
    name = head[30:30 + nlen].decode("utf-8", "replace")
    if name != member.name or method != 0:
        raise ArchiveError(f"member {member.name}: its local header names {name!r} with method {method}")
    # Sizes may be 0 (written after the data: flag bit 3) or 0xFFFFFFFF (zip64); otherwise they must agree.
    if csize not in (0, 0xFFFFFFFF, member.size) or usize not in (0, 0xFFFFFFFF, member.size):
        raise ArchiveError(f"member {member.name}: the local header says {usize} bytes, the directory "
                           f"{member.size}")
    start = member.header + 30 + nlen + elen
    if start + member.size > member.limit:
        raise ArchiveError(f"member {member.name}: its {member.size} bytes at {start} run past the directory")
    return start

"""Reading checkpoint bytes: headers with one small range read, tensors by byte range.

Local files are read with `preadv`, remote ones with ranged GETs (the executor reads ahead).
Either way a caller asks for `(file, start, end)` and gets a buffer of exactly that many bytes.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any

import numpy as np

from ckptflow.storage.listing import version_of
from ckptflow.storage.read_runs import RunCache
from ckptflow.storage.safetensors_format import (HEADER_PROBE_BYTES, Header, HeaderError, decode_header, header_length,
                                  parse_header_text)
from ckptflow.storage.urls import Location, StorageError
from ckptflow.storage.writeback import drop_cached

ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffer addresses (a multiple of 512)
DIRECT_MIN = 1 << 20  # smaller ranges: one copy from the page cache costs less than a disk round trip

# Headers larger than the probe are read and parsed one at a time. Real ones are a few KB to a
# few MB, so this costs nothing; but 16 threads each holding a 100 MB hostile header and its
# parsed form at once would hold gigabytes, and parsing holds the GIL anyway.
_LARGE_HEADER = threading.Lock()


def _cat(loc: Location, name: str, start: int, end: int) -> bytes:
    try:
        return loc.fs.cat_file(loc.path(name), start=start, end=end)
    except FileNotFoundError:
        raise StorageError(f"{loc.url_of(name)}: file not found") from None


def read_header(loc: Location, name: str, file_size: int | None = None) -> Header:
    """Read and parse the safetensors header of `name`: usually one range read of ≤ 256 KiB."""
    if file_size is None:
        file_size = file_info(loc, name)["size"]
    probe = _cat(loc, name, 0, min(file_size, HEADER_PROBE_BYTES))
    n = header_length(name, probe, file_size)
    if 8 + n <= len(probe):
        return parse_header_text(name, decode_header(name, probe, n), n, file_size)
    with _LARGE_HEADER:
        raw = probe + _cat(loc, name, len(probe), 8 + n)
        del probe
        if len(raw) < 8 + n:
            raise HeaderError(name, f"the file ended after {len(raw)} of its {8 + n} header bytes; it "
                                    "changed while being read or is truncated — fetch it again")
        text = decode_header(name, raw, n)
        del raw  # only the text is needed from here on: one copy of the header, not two
        return parse_header_text(name, text, n, file_size)


def file_info(loc: Location, name: str) -> dict[str, Any]:
    """size plus whatever identifies this version of the file (etag, mtime)."""
    try:
        info = loc.fs.info(loc.path(name))
    except FileNotFoundError:
        raise StorageError(f"{loc.url_of(name)}: file not found") from None
    etag = info.get("ETag") or info.get("etag")
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    return {"size": int(info["size"]), "version": version_of(info),
            "etag": str(etag).strip('"') if etag else None, "sha256": lfs.get("sha256")}


class RangeReader:
    """Reads byte ranges of files under one location; keeps local files open while in use.

    Local files are read with `preadv` into fresh buffers rather than memory-mapped: mapped
    pages that have been touched count toward the process's resident set until unmapped, so a
    mapped 5 GB shard would show as 5 GB of RSS. One copy from the page cache is cheap.

    `drop_behind`: whole ranges read from local files are dropped from the page cache once read
    (`writeback.drop_cached`), for callers that read each source byte once. Column slices are
    not: the MP ranks that read a matrix's other columns share those pages. Such a range of at
    least `DIRECT_MIN` bytes, read into a page-aligned `out` with `SLACK` bytes to spare, is read
    with O_DIRECT instead: the disk fills our buffer and the page cache is not involved at all
    (reading 4 GB here: 1.4 s of system CPU through the cache, 0.2 s direct). The bytes come back
    as a view into `out` at the range's offset within its first page. Where O_DIRECT is refused
    (tmpfs, some FUSE mounts, macOS), reads go through the page cache as before.

    On an object store each range is a ranged GET, but small neighbouring ranges announced with
    `expect` come with one GET per run of them (`read_runs`).
    """

    SLACK = 2 * ALIGN  # what an O_DIRECT read needs beyond the range: its partial first and last pages

    def __init__(self, loc: Location, drop_behind: bool = False):
        self.loc = loc
        self.drop_behind = drop_behind and loc.is_local
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self._refused: list[int] = []
        self._lock = threading.Lock()
        self._runs = None if loc.is_local else RunCache(self._get)

    def expect(self, ranges: Any) -> None:
        """(file, start, end) ranges about to be read: on an object store, runs of small ones
        side by side are then fetched with one GET each. Nothing changes for local files."""
        if self._runs is not None:
            self._runs.expect(ranges)

    def fd(self, name: str) -> int:
        """An OS file descriptor of local file `name`, open until `close()`."""
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = os.open(self.loc.path(name), os.O_RDONLY)
                except FileNotFoundError:
                    raise StorageError(f"{self.loc.url_of(name)}: file not found") from None
                self._fds[name] = fd
            return fd

    def read(self, name: str, start: int, end: int, out: Any = None) -> memoryview | bytes:
        """Bytes [start, end) of file `name`; local reads land in `out` (≥ end - start bytes) if given."""
        return self._read(name, start, end, out, self.drop_behind)

    def _read(self, name: str, start: int, end: int, out: Any, drop: bool) -> memoryview | bytes:
        if self.loc.is_local:
            if drop and out is not None and end - start >= DIRECT_MIN:
                got = self._read_direct(name, start, end, memoryview(out).cast("B"))
                if got is not None:  # pages cached before (a fresh download) go all the same
                    drop_cached(self.fd(name), start, end - start)
                    return got
            buf = memoryview(out).cast("B")[:end - start] if out is not None else memoryview(bytearray(end - start))
            self._pread_into(name, buf, start)
            if drop:
                drop_cached(self.fd(name), start, end - start)
            return buf
        if self._runs is not None:
            got = self._runs.read(name, start, end)
            if got is not None:
                return got
        return self._get(name, start, end)

    def _get(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of remote file `name`, all of them or an error."""
        data = _cat(self.loc, name, start, end)
        if len(data) != end - start:
            raise StorageError(f"{self.loc.url_of(name)}: short read ({len(data)} of {end - start} "
                               "bytes); the object changed or was truncated since validation")
        return data

    def read_columns(self, name: str, start: int, end: int, row: int, lo: int, hi: int, out: Any = None
                     ) -> memoryview | bytes:
        """Bytes [lo, hi) of each `row`-byte row of [start, end), back to back (a column slice of a
        row-major matrix). A narrow slice of a local file is read one row at a time, so only its
        bytes leave the page cache or the disk; otherwise (wide slice, object store: one ranged
        GET beats a request per row) the rows are read whole and cut here."""
        n, width = (end - start) // row, hi - lo
        if self.loc.is_local and 2 * width <= row:
            buf = memoryview(out).cast("B")[:n * width] if out is not None else memoryview(bytearray(n * width))
            for i in range(n):
                self._pread_into(name, buf[i * width:(i + 1) * width], start + i * row + lo)
            return buf
        import numpy as np

        rows = np.frombuffer(self._read(name, start, end, None, False), dtype=np.uint8).reshape(n, row)
        dst = np.frombuffer(memoryview(out).cast("B")[:n * width], dtype=np.uint8) if out is not None \
            else np.empty(n * width, dtype=np.uint8)
        dst.reshape(n, width)[:] = rows[:, lo:hi]
        return memoryview(dst).cast("B")

    def _read_direct(self, name: str, start: int, end: int, out: memoryview) -> memoryview | None:
        """Bytes [start, end) read with O_DIRECT into `out`, as a view of it; None where that
        cannot be done (buffer too small or unaligned, O_DIRECT refused): read buffered then."""
        first = start - start % ALIGN
        span = -(-(end - first) // ALIGN) * ALIGN
        if len(out) < span or np.frombuffer(out, dtype=np.uint8).ctypes.data % ALIGN:
            return None
        fd = self._direct_fd(name)
        if fd is None:
            return None
        got = 0
        while got < end - first:
            try:
                n = os.preadv(fd, [out[got:span]], first + got)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                with self._lock:  # refused here (alignment this filesystem wants): buffered from now on;
                    self._direct_fds[name] = None  # the fd stays open until close(): another read may be using it
                    self._refused.append(fd)
                return None
            if n == 0:
                raise StorageError(f"{self.loc.url_of(name)}: wanted bytes up to {end} but the file ends at "
                                   f"{os.fstat(fd).st_size}; it changed or was truncated since validation")
            got += n
        return out[start - first:end - first]

    def _direct_fd(self, name: str) -> int | None:
        with self._lock:
            if name not in self._direct_fds:
                flag = getattr(os, "O_DIRECT", 0)
                try:
                    self._direct_fds[name] = os.open(self.loc.path(name), os.O_RDONLY | flag) if flag else None
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    self._direct_fds[name] = None
            return self._direct_fds[name]

    def _pread_into(self, name: str, buf: memoryview, at: int) -> None:
        """Fill `buf` from local file `name` at offset `at`; a file that ends first is an error."""
        fd, got = self.fd(name), 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], at + got)
            if n == 0:
                raise StorageError(f"{self.loc.url_of(name)}: wanted bytes up to {at + len(buf)} but the file "
                                   f"ends at {os.fstat(fd).st_size}; it changed or was truncated since validation")
            got += n

    def close(self) -> None:
        with self._lock:
            for fd in {*self._fds.values(), *self._direct_fds.values(), *self._refused} - {None}:
                os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
            self._refused.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HeaderError", "RangeReader", "file_info", "read_header"]

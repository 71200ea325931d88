"""Reading checkpoint bytes: headers with one small range read, tensors by byte range.

Local files are memory-mapped (copy-on-write, so torch can wrap the pages without copying and
without a read-only warning); remote files are read with ranged GETs. Either way a caller asks
for `(file, start, end)` and gets a buffer of exactly that many bytes.
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Any

from .safetensors_format import HEADER_PROBE_BYTES, Header, HeaderError, header_length, parse_header
from .urls import Location, StorageError


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
    if 8 + n > len(probe):
        probe += _cat(loc, name, len(probe), 8 + n)
    return parse_header(name, probe, file_size)


def file_info(loc: Location, name: str) -> dict[str, Any]:
    """size plus whatever identifies this version of the file (etag, mtime)."""
    try:
        info = loc.fs.info(loc.path(name))
    except FileNotFoundError:
        raise StorageError(f"{loc.url_of(name)}: file not found") from None
    etag = info.get("ETag") or info.get("etag")
    version = etag or info.get("md5Hash") or info.get("mtime") or info.get("LastModified") \
        or info.get("last_modified") or info.get("created")
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    return {"size": int(info["size"]), "version": str(version) if version is not None else None,
            "etag": str(etag).strip('"') if etag else None, "sha256": lfs.get("sha256")}


class RangeReader:
    """Reads byte ranges of files under one location; keeps local files mapped while open."""

    def __init__(self, loc: Location):
        self.loc = loc
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _map(self, name: str) -> mmap.mmap:
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                try:
                    fd = os.open(self.loc.path(name), os.O_RDONLY)
                except FileNotFoundError:
                    raise StorageError(f"{self.loc.url_of(name)}: file not found") from None
                try:
                    m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
                self._maps[name] = m
            return m

    def read(self, name: str, start: int, end: int) -> memoryview | bytes:
        """Bytes [start, end) of file `name`; a zero-copy view for local files."""
        self.bytes_read += end - start
        if self.loc.is_local:
            m = self._map(name)
            if end > len(m):
                raise StorageError(f"{self.loc.url_of(name)}: wanted bytes up to {end} but the file "
                                   f"has {len(m)}; it changed or was truncated since validation")
            return memoryview(m)[start:end]
        data = _cat(self.loc, name, start, end)
        if len(data) != end - start:
            raise StorageError(f"{self.loc.url_of(name)}: short read ({len(data)} of {end - start} "
                               "bytes); the object changed or was truncated since validation")
        return data

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:
                    pass  # a tensor still views these pages; the map closes when it is collected
            self._maps.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HeaderError", "RangeReader", "file_info", "read_header"]

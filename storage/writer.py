"""Streaming safetensors writer with atomic commit.

The header is known up front from the plan, so the file is written front to back with no
whole-shard buffer: header, then each tensor's bytes in order, in as many pieces as the caller
likes. Nothing appears under the final name until every byte is written:
- local disk: a hidden temp file in the same directory, then `os.replace`;
- object stores (s3fs, gcsfs, adlfs: fsspec buffered files): the final key is written with a
  multipart upload that only completes on `commit`; `abort` discards it;
- anything else: a temp name, then `fs.mv`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

from .safetensors_format import TensorSpec, build_header
from .urls import Location


@dataclass(frozen=True)
class WrittenFile:
    """The small record a shard task returns: enough to find and verify the output."""

    url: str
    name: str
    size: int
    sha256: str | None  # None unless the writer was asked to hash (it costs ~1 s/GB of CPU)
    tensors: int

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.name, "size": self.size, "sha256": self.sha256,
                "tensors": self.tensors}


def temp_name(name: str) -> str:
    head, tail = os.path.split(name)
    return os.path.join(head, f".{tail}.partial-{uuid.uuid4().hex[:8]}")


class AtomicFile:
    """A binary file that becomes visible under its final name only on `commit()`."""

    def __init__(self, loc: Location, name: str, digest: bool = False):
        self.loc, self.name = loc, name
        self.final = loc.path(name)
        parent = os.path.dirname(self.final)
        if parent:
            loc.fs.makedirs(parent, exist_ok=True)
        self._direct = not loc.is_local and _buffered_object_store(loc.fs)
        self._path = self.final if self._direct else loc.path(temp_name(name))
        # Local files are plain unbuffered OS files, so `copy_range` can hand bytes to the kernel.
        self._f = open(self._path, "wb", buffering=0) if loc.is_local else loc.fs.open(self._path, "wb")
        self.size = 0
        self._sha = hashlib.sha256() if digest else None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:  # an unbuffered OS file may write less than asked
            n = self._f.write(view)
            view = view[n if n is not None else len(view):]
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)

    def copy_range(self, src_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes of the file open as `src_fd` from `offset`, in the kernel.

        `copy_file_range` moves the bytes without bringing them through user space (a reflink
        on filesystems that share extents). Falls back to reading when unsupported.
        """
        if self._sha is None and self.loc.is_local and hasattr(os, "copy_file_range"):
            out_fd = self._f.fileno()
            done = 0
            try:
                while done < length:
                    n = os.copy_file_range(src_fd, out_fd, length - done, offset + done)
                    if n == 0:
                        raise OSError(f"{self.name}: source ended {length - done} bytes early")
                    done += n
                self.size += length
                return
            except OSError as exc:
                if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        while length:
            chunk = os.pread(src_fd, min(length, 8 << 20), offset)
            if not chunk:
                raise OSError(f"{self.name}: source ended {length} bytes early")
            self.write(chunk)
            offset += len(chunk)
            length -= len(chunk)

    @property
    def sha256(self) -> str | None:
        return self._sha.hexdigest() if self._sha is not None else None

    def commit(self) -> None:
        self._f.close()  # completes the multipart upload on object stores
        if not self._direct:
            if self.loc.is_local:
                os.replace(self._path, self.final)
            else:
                self.loc.fs.mv(self._path, self.final)

    def abort(self) -> None:
        try:
            if self._direct and hasattr(self._f, "discard"):
                self._f.discard()  # abort the multipart upload: no final object appears
                self._f.closed = True  # else fsspec's __del__ flushes the discarded buffer
            else:
                self._f.close()
                self.loc.fs.rm(self._path)
        except Exception:  # best effort: the temp name is never mistaken for output
            pass


def _buffered_object_store(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"} for p in protocols)


class SafetensorsWriter:
    """Write one safetensors file whose tensors are declared up front, streaming their bytes.

    Call `commit()` once every byte is written; as a context manager an exception aborts.
    """

    def __init__(self, loc: Location, name: str, specs: list[TensorSpec],
                 metadata: dict[str, str] | None = None, digest: bool = False):
        self.loc, self.name, self.specs = loc, name, specs
        self._file = AtomicFile(loc, name, digest)
        self._file.write(build_header(specs, metadata or {"format": "pt"}))
        self._index = 0
        self._left = specs[0].nbytes if specs else 0

    def write(self, name: str, data: bytes | memoryview) -> None:
        """Append bytes of tensor `name`; tensors must come in declared order, in any pieces."""
        self._check(name, len(data))
        self._file.write(data)
        self._left -= len(data)
        if self._left == 0:
            self._advance()

    def _check(self, name: str, length: int) -> None:
        while self._index < len(self.specs) and self._left == 0 and self.specs[self._index].nbytes == 0 \
                and self.specs[self._index].name != name:
            self._advance()
        spec = self.specs[self._index] if self._index < len(self.specs) else None
        if spec is None or spec.name != name:
            expected = spec.name if spec else "nothing more"
            raise RuntimeError(f"{self.name}: got bytes for {name!r} but expected {expected!r}")
        if length > self._left:
            raise RuntimeError(f"{self.name}: tensor {name!r} got more than its {spec.nbytes} bytes")

    def copy_range(self, name: str, src_fd: int, offset: int, length: int) -> None:
        """Like `write`, but the bytes are `length` bytes of `src_fd` from `offset` (see AtomicFile)."""
        self._check(name, length)
        self._file.copy_range(src_fd, offset, length)
        self._left -= length
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        self._index += 1
        self._left = self.specs[self._index].nbytes if self._index < len(self.specs) else 0

    def commit(self) -> WrittenFile:
        while self._index < len(self.specs) and self.specs[self._index].nbytes == 0:
            self._advance()
        if self._index < len(self.specs):
            missing = self.specs[self._index].name
            self._file.abort()
            raise RuntimeError(f"{self.name}: tensor {missing!r} was not fully written; nothing committed")
        self._file.commit()
        return WrittenFile(self.loc.url_of(self.name), self.name, self._file.size,
                           self._file.sha256, len(self.specs))

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()

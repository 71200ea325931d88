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

import dataclasses
import errno
import hashlib
import os
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from ckptflow.storage import direct_io
from ckptflow.storage.listing import file_identity, local_identity_before_rename
from ckptflow.storage.object_lock import ensure_held, ensure_not_lost
from ckptflow.storage.safetensors_format import SHARD_METADATA, TensorSpec, build_header
from ckptflow.storage.urls import Location, StorageError
from ckptflow.storage.writeback import WINDOW, RollingWriteback, drop_cached


@dataclass(frozen=True)
class WrittenFile:
    """The small record a shard task returns: enough to find and verify the output."""

    url: str
    name: str
    size: int
    sha256: str | None  # None unless the writer was asked to hash (it costs ~1 s/GB of CPU)
    tensors: int
    identity: str | None = None  # what proves, on resume, that the file is still this one
    # (tensor, count) of inf/NaN dequant wrote from finite codes (only with --allow-nonfinite)
    nonfinite: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.name, "size": self.size, "sha256": self.sha256,
                "tensors": self.tensors, "identity": self.identity, "nonfinite": dict(self.nonfinite)}


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a directory's entries are data of their own)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    head, tail = os.path.split(name)
    return os.path.join(head, f".{tail}.partial-{uuid.uuid4().hex[:8]}")


class AtomicFile:
    """A binary file that becomes visible under its final name only on `commit()`."""

    def __init__(self, loc: Location, name: str, digest: bool = False, expected_size: int | None = None,
                 direct: bool = False):
        """`direct`: a local file of at least `direct_io.MIN_BYTES` (`expected_size`) is written
        with O_DIRECT where the filesystem allows (`direct_io.DirectSink`)."""
        self.loc, self.name, self.expected_size = loc, name, expected_size
        ensure_not_lost(loc, name)  # a run that lost DEST's lock starts no file there (no-op elsewhere)
        self.final = loc.path(name)
        parent = os.path.dirname(self.final)
        if parent and not loc.is_object_store:  # s3fs's makedirs creates a missing bucket
            loc.fs.makedirs(parent, exist_ok=True)
        self._direct = not loc.is_local and _buffered_object_store(loc.fs)
        self._path = self.final if self._direct else loc.path(temp_name(name))
        # Local files are plain unbuffered OS files, so `copy_range` can hand bytes to the kernel.
        self._f = open(self._path, "wb", buffering=0) if loc.is_local else loc.fs.open(self._path, "wb")
        self.size = 0
        self._sha = hashlib.sha256() if digest else None
        self._sink: direct_io.DirectSink | None = None
        if direct and loc.is_local and (expected_size or 0) >= direct_io.MIN_BYTES:
            fd = direct_io.open_direct(self._path)
            if fd is not None:
                self._sink = direct_io.DirectSink(fd, self._f.fileno())
        self._writeback = RollingWriteback(self._f.fileno()) if loc.is_local and self._sink is None else None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            if self._sink is not None:
                self._sink.write(view)
            else:
                while view:  # an unbuffered OS file may write less than asked
                    n = self._f.write(view)
                    view = view[n if n is not None else len(view):]
        except OSError as exc:
            raise self._disk_error(exc, len(view)) from None
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)
        if self._writeback is not None:
            self._writeback.wrote(self.size)

    def copy_range(self, src_fd: int, offset: int, length: int, drop_source: bool = False) -> None:
        """Append `length` bytes of the file open as `src_fd` from `offset`, in the kernel.

        `copy_file_range` moves the bytes without bringing them through user space (a reflink
        on filesystems that share extents). Falls back to reading when unsupported.
        `drop_source`: drop each copied window of the source from the page cache (see
        `writeback.drop_cached`). Written with O_DIRECT, the bytes are read into its staging
        buffer instead (one copy either way).
        """
        if self._sink is not None and self._sha is None:
            after = (lambda at, n: drop_cached(src_fd, at, n)) if drop_source else None
            try:
                self._sink.fill_from(src_fd, offset, length, after)
            except OSError as exc:
                raise (OSError(f"{self.name}: {exc}") if exc.errno is None else self._disk_error(exc, length)) from exc
            self.size += length
            return
        if self._sha is None and self.loc.is_local and hasattr(os, "copy_file_range"):
            out_fd = self._f.fileno()
            done = 0
            try:
                while done < length:
                    n = os.copy_file_range(src_fd, out_fd, min(length - done, WINDOW), offset + done)
                    if n == 0:
                        raise OSError(f"{self.name}: source ended {length - done} bytes early")
                    if drop_source:
                        drop_cached(src_fd, offset + done, n)
                    done += n
                    if self._writeback is not None:
                        self._writeback.wrote(self.size + done)
                self.size += length
                return
            except OSError as exc:
                if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise self._disk_error(exc, length - done) from exc
        while length:
            chunk = os.pread(src_fd, min(length, 8 << 20), offset)
            if not chunk:
                raise OSError(f"{self.name}: source ended {length} bytes early")
            if drop_source:
                drop_cached(src_fd, offset, len(chunk))
            self.write(chunk)
            offset += len(chunk)
            length -= len(chunk)

    @property
    def sha256(self) -> str | None:
        return self._sha.hexdigest() if self._sha is not None else None

    def _disk_error(self, exc: OSError, pending: int) -> Exception:
        """ENOSPC and friends, as one line naming the file and the bytes still to write."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return exc
        need = (f"; {self.expected_size - self.size:,} more bytes were needed for it"
                if self.expected_size else f"; {pending:,} bytes were still to be written")
        return StorageError(f"{self.loc.url_of(self.name)}: {os.strerror(exc.errno).lower()} after "
                            f"{self.size:,} bytes{need}. Nothing was published under that name; free "
                            "space (or choose another DEST) and run the same command again to resume")

    def commit(self, before_publish: Callable[[str | None], None] | None = None) -> None:
        """Publish the file under its final name.

        Locally the bytes and then the directory entry are fsynced, so a power cut leaves either
        no file or the whole file under the final name, never a renamed file of zeros.
        `before_publish(identity)` runs once every byte is durable and before the name appears,
        with the local file's `local_identity_before_rename` (None on other stores): a record
        written there leaves no instant in which the file is published but unrecorded. If it
        raises, the file is aborted (temp file removed, multipart upload discarded)."""
        if self.loc.is_local:
            try:
                if self._sink is not None:
                    self._sink.finish()
                    self._sink = None
                os.fsync(self._f.fileno())
            except OSError as exc:
                raise self._disk_error(exc, 0) from None
        try:  # under an object-store DEST whose lock this run has lost, nothing more is published
            ensure_held(self.loc, self.name)
        except BaseException:
            self.abort()
            raise
        if before_publish is not None:
            try:
                before_publish(local_identity_before_rename(os.fstat(self._f.fileno())) if self.loc.is_local else None)
            except BaseException:
                self.abort()  # a refusal there (a source changed, the journal unwritable) publishes nothing
                raise
        self._f.close()  # completes the multipart upload on object stores
        if not self._direct:
            if self.loc.is_local:
                os.replace(self._path, self.final)
                fsync_dir(os.path.dirname(self.final))
            else:
                self.loc.fs.mv(self._path, self.final)

    def abort(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close()
            except Exception:
                pass
            self._sink = None
        try:
            if self._direct and hasattr(self._f, "discard"):
                try:
                    self._f.discard()  # abort the multipart upload: no final object appears
                finally:  # even when the endpoint is gone: else fsspec's __del__ uploads the buffer again
                    self._f.closed = True
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
                 metadata: dict[str, str] | None = None, digest: bool = False, direct: bool = True):
        """`direct`: see `AtomicFile` (a file of kernel copies is better left to `copy_file_range`,
        which shares extents on filesystems that can)."""
        self.loc, self.name, self.specs = loc, name, specs
        header = build_header(specs, metadata or SHARD_METADATA)
        self._file = AtomicFile(loc, name, digest, expected_size=len(header) + sum(s.nbytes for s in specs),
                                direct=direct)
        self._file.write(header)
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

    def copy_range(self, name: str, src_fd: int, offset: int, length: int, drop_source: bool = False) -> None:
        """Like `write`, but the bytes are `length` bytes of `src_fd` from `offset` (see AtomicFile)."""
        self._check(name, length)
        self._file.copy_range(src_fd, offset, length, drop_source)
        self._left -= length
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        self._index += 1
        self._left = self.specs[self._index].nbytes if self._index < len(self.specs) else 0

    def commit(self, before_publish: Callable[[WrittenFile, str | None], None] | None = None) -> WrittenFile:
        """Publish the file; `before_publish(record, identity)` as in `AtomicFile.commit`, with the
        record this returns (its `identity` not yet known)."""
        while self._index < len(self.specs) and self.specs[self._index].nbytes == 0:
            self._advance()
        if self._index < len(self.specs):
            missing = self.specs[self._index].name
            self._file.abort()
            raise RuntimeError(f"{self.name}: tensor {missing!r} was not fully written; nothing committed")
        record = WrittenFile(self.loc.url_of(self.name), self.name, self._file.size, self._file.sha256,
                             len(self.specs))
        try:
            self._file.commit(None if before_publish is None else lambda identity: before_publish(record, identity))
        except BaseException:
            self._file.abort()  # e.g. CompleteMultipartUpload timed out: do not leave the upload pending
            raise
        return dataclasses.replace(record, identity=file_identity(self.loc, self.name))

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()

"""One DEST, one run: a lock held for the whole conversion.

Two runs writing one DEST would delete each other's temp files and interleave shards. Locally
the lock is `flock` on `DEST/.ckptflow.lock`: the kernel drops it when the holder dies, however
it dies, so a dead run never blocks the next. Object stores have no locks: there it is a leased
object written only by compare-and-swap (`storage.object_lock`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator

from ckptflow.storage.lock_common import (HEARTBEAT_S, LOCK_NAME, STALE_S, DestBusy, LockLost,  # noqa: F401
                                          TakeoverHook, holder_of, new_holder, report_takeover)
from ckptflow.storage.object_lock import ensure_held, object_lock, release_held  # noqa: F401
from ckptflow.storage.urls import Location, StorageError


@contextlib.contextmanager
def dest_lock(dst: Location, owner: dict[str, object] | None = None,
              on_takeover: TakeoverHook | None = None) -> Iterator[None]:
    """Hold DEST's lock for the block; raises `DestBusy` at once if a live run holds it.

    `owner` goes into the lock record (the flow run id); `on_takeover(record)` is told the record
    of a dead run whose lock this run took (a local lock file whose flock its killed holder left,
    a stale object-store lock), so that run can be marked as crashed."""
    with (_local_lock(dst, owner, on_takeover) if dst.is_local else object_lock(dst, owner, on_takeover)):
        yield


@contextlib.contextmanager
def _local_lock(dst: Location, owner: dict[str, object] | None = None,
                on_takeover: TakeoverHook | None = None) -> Iterator[None]:
    if os.path.exists(dst.root) and not os.path.isdir(dst.root):
        raise StorageError(f"DEST {dst.url} is a file, not a directory; choose a directory")
    created = not os.path.exists(dst.root)
    os.makedirs(dst.root, exist_ok=True)
    path = dst.path(LOCK_NAME)
    try:
        fd = _locked_fd(dst, path)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(dst.root)
        raise
    # A record left in the file is a dead run's (a live one would hold the flock): a SIGKILLed run
    # cannot unlink its lock file as it goes.
    report_takeover(on_takeover, holder_of(os.pread(fd, 4096, 0)))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(new_holder(owner)).encode(), 0)
        yield
    finally:
        # Leave DEST as it was found: no lock file, and no empty folder a failed run made.
        with contextlib.suppress(OSError):
            os.unlink(path)  # a name swapped in since is only unlinked, never followed
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(dst.root)  # only if empty


def _locked_fd(dst: Location, path: str) -> int:
    """An fd of DEST's own lock file, flocked. The file is written (truncated, then the holder
    record), so it must be a plain file of DEST's: never a link's target, however it is linked."""
    import fcntl

    while True:
        fd = _open_lock_file(dst, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = holder_of(os.pread(fd, 4096, 0))
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise DestBusy(dst, holder, "its lock is released the moment that process exits") from None
        # The holder before us unlinks the file as it lets go; a lock on that unlinked file
        # would be a lock on nothing, so make sure the name still is the file we locked.
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_lock_file(dst: Location) -> None:
    """Refuse, before anything starts, a local DEST whose lock name holds something that is not
    a lock file of ckptflow's (taking the lock checks again, on the file it opened)."""
    path = dst.path(LOCK_NAME)
    try:
        st = os.lstat(path)
    except OSError:
        return  # absent (the usual case), or unreadable: taking the lock says why
    what = _foreign(st, path)
    if what is not None:
        raise _not_a_lock(dst, path, what)


def _open_lock_file(dst: Location, path: str) -> int:
    # O_NOFOLLOW: a symlink (dangling or not) at the lock's name fails with ELOOP instead of
    # creating or truncating the file it points to (a SOURCE shard, say). O_NONBLOCK: a FIFO
    # there must not hang the open.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
            raise _not_a_lock(dst, path, _foreign(os.lstat(path), path) or "not a regular file") from None
        raise StorageError(f"DEST {dst.url}: cannot open its lock file {path} ({exc.strerror}); "
                           "check DEST's permissions") from None
    what = _foreign(os.fstat(fd), path)
    if what is not None:
        os.close(fd)
        raise _not_a_lock(dst, path, what)
    return fd


def _foreign(st: os.stat_result, path: str) -> str | None:
    """What the thing at the lock's name is, if it is not a file ckptflow may truncate and write:
    a link (whose target would be written), a second name of another file, or no file at all."""
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link to {os.readlink(path)!r}"
    if stat.S_ISREG(st.st_mode):
        return f"a file with {st.st_nlink} hard links" if st.st_nlink > 1 else None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(st.st_mode):
            return name
    return "not a regular file"


def _not_a_lock(dst: Location, path: str, what: str) -> StorageError:
    return StorageError(f"DEST {dst.url}: its lock file {path} is {what}, not a file of ckptflow's; ckptflow "
                        "writes that file and never follows or replaces what is there. Remove it (or choose "
                        "another DEST) and run again; nothing was written")

"""One DEST, one run: a lock held for the whole conversion.

Two runs writing one DEST would delete each other's temp files and interleave shards. Locally
the lock is `flock` on `DEST/.ckptflow.lock`: the kernel drops it when the holder dies, however
it dies, so a dead run never blocks the next. Object stores have no locks: there it is an
object holding the holder's identity and a heartbeat refreshed every `HEARTBEAT_S`; one whose
heartbeat is older than `STALE_S` belongs to a dead run and is taken over.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from ckptflow.storage.urls import Location, StorageError

LOCK_NAME = ".ckptflow.lock"
HEARTBEAT_S = 20.0
STALE_S = 90.0


class DestBusy(StorageError):
    """Another live run holds DEST's lock."""


def _holder() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex, "heartbeat": time.time()}


def _busy(dst: Location, holder: dict[str, object] | None) -> DestBusy:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
           if isinstance(holder, dict) else "holder unknown")
    return DestBusy(f"DEST {dst.url} is being written by another ckptflow run ({who}); wait for it to "
                    "finish, or choose another DEST")


@contextlib.contextmanager
def dest_lock(dst: Location) -> Iterator[None]:
    """Hold DEST's lock for the block; raises `DestBusy` at once if a live run holds it."""
    with (_local_lock(dst) if dst.is_local else _object_lock(dst)):
        yield


@contextlib.contextmanager
def _local_lock(dst: Location) -> Iterator[None]:
    import fcntl

    if os.path.exists(dst.root) and not os.path.isdir(dst.root):
        raise StorageError(f"DEST {dst.url} is a file, not a directory; choose a directory")
    created = not os.path.exists(dst.root)
    os.makedirs(dst.root, exist_ok=True)
    path = dst.path(LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                holder = None
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise _busy(dst, holder) from None
        # The holder before us unlinks the file as it lets go; a lock on that unlinked file
        # would be a lock on nothing, so make sure the name still is the file we locked.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        # Leave DEST as it was found: no lock file, and no empty folder a failed run made.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(dst.root)  # only if empty


def _read_lock(dst: Location) -> dict[str, object] | None:
    try:
        with dst.fs.open(dst.path(LOCK_NAME), "rb") as f:
            value = json.loads(f.read(4096) or b"null")
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_lock(dst: Location, holder: dict[str, object]) -> None:
    with dst.fs.open(dst.path(LOCK_NAME), "wb") as f:
        f.write(json.dumps(holder).encode())


# Object-store locks this process holds (token → DEST), for `release_held`.
_HELD: dict[str, Location] = {}


def release_held() -> None:
    """Delete every object-store lock this process holds that is still ours: called by the CLI's
    interrupt handler, which leaves without unwinding the `dest_lock` blocks (local flocks need
    nothing: the kernel drops them with the process)."""
    for token, dst in list(_HELD.items()):
        with contextlib.suppress(Exception):
            if (_read_lock(dst) or {}).get("token") == token:
                dst.fs.rm(dst.path(LOCK_NAME))


@contextlib.contextmanager
def _object_lock(dst: Location) -> Iterator[None]:
    current = _read_lock(dst)
    if current is not None and time.time() - float(current.get("heartbeat") or 0) < STALE_S:
        raise _busy(dst, current)
    me = _holder()
    _write_lock(dst, me)
    time.sleep(0.5)  # two runs that wrote at once: the later write wins, the earlier sees it
    seen = _read_lock(dst)
    if seen is None or seen.get("token") != me["token"]:
        raise _busy(dst, seen)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only shortens the lease
                _write_lock(dst, {**me, "heartbeat": time.time()})

    thread = threading.Thread(target=beat, name="ckptflow-lock-heartbeat", daemon=True)
    thread.start()
    _HELD[str(me["token"])] = dst
    try:
        yield
    finally:
        _HELD.pop(str(me["token"]), None)
        stop.set()
        thread.join(5)
        with contextlib.suppress(Exception):
            if (_read_lock(dst) or {}).get("token") == me["token"]:
                dst.fs.rm(dst.path(LOCK_NAME))

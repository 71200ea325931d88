"""Rolling writeback for a file written front to back and fsynced at the end.

Left alone, the kernel holds a whole shard (~4.3 GB) dirty in the page cache and writes most of
it out during the final `fsync`, so writing and flushing do not overlap, and the dirty pages
crowd out everything else in memory. Here, every `WINDOW` bytes, writeback of the window just
written starts (`sync_file_range(WRITE)`), the window before it is waited for and dropped from
the page cache (ckptflow never reads its output bytes back). The disk works while the next
window is computed, the final `fsync` finds almost nothing left to do, and the output's page
cache stays at two windows. Durability still comes from that `fsync`: this only schedules.

Linux only (glibc's `sync_file_range`); elsewhere, and on failure, it does nothing.

`drop_cached` is the read side of the same idea: a source byte range ckptflow has consumed is
dropped from the page cache (`dd iflag=nocache`), so a conversion reads a 700 GB model through a
page cache that recycles a few windows instead of filling all of memory and then making the
kernel reclaim it. On a virtual machine whose free memory goes back to the host, filling fresh
pages is the dearest part: a 13 GB conversion here spent 30 s of its 46 s of system time there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

WINDOW = 64 << 20
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load() if os.name == "posix" else None


_fadvise = getattr(os, "posix_fadvise", None)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Advise the kernel that bytes [offset, offset + length) of `fd` will not be read again.

    Only whole clean pages inside the range go (partial pages at its ends stay), mapped and
    dirty pages stay; a no-op where unsupported (tmpfs, non-Linux)."""
    if _fadvise is not None and length > 0:
        try:
            _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class RollingWriteback:
    """Call `wrote(total)` after each write with the file's size so far."""

    def __init__(self, fd: int, window: int = WINDOW):
        self.fd, self.window = fd, window
        self._started = 0   # bytes [0, _started) have had writeback started
        self._prev: tuple[int, int] | None = None
        self._on = _sync_file_range is not None

    def wrote(self, total: int) -> None:
        if not self._on or total - self._started < self.window:
            return
        start, length = self._started, total - self._started
        if _sync_file_range(self.fd, start, length, _WRITE) != 0:
            self._on = False  # not supported here (e.g. some FUSE mounts): the final fsync does it all
            return
        if self._prev is not None:
            a, n = self._prev
            _sync_file_range(self.fd, a, n, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            drop_cached(self.fd, a, n)
        self._prev, self._started = (start, length), total

"""Rolling writeback for a file written front to back and fsynced at the end.

Left alone, the kernel holds a whole shard (~4.3 GB) dirty in the page cache and writes most of
it out during the final `fsync`, so writing and flushing do not overlap, and the dirty pages
crowd out everything else in memory. Here, every `WINDOW` bytes, writeback of the window just
written starts (`sync_file_range(WRITE)`), the window before it is waited for and dropped from
the page cache (ckptflow never reads its output bytes back). The disk works while the next
window is computed, the final `fsync` finds almost nothing left to do, and the output's page
cache stays at two windows. Durability still comes from that `fsync`: this only schedules.

Linux only (glibc's `sync_file_range`); elsewhere, and on failure, it does nothing.
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
            os.posix_fadvise(self.fd, a, n, os.POSIX_FADV_DONTNEED)
        self._prev, self._started = (start, length), total

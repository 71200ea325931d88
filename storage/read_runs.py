"""Small neighbouring ranges of an object store, fetched with one GET per run.

Each tensor a shard reads is a ranged GET of its own. For small ones (norms, biases, per-tensor
scales, all of a small model) the request costs more than its bytes: converting the demo from S3
made 243 GETs of tensor data, a few KB each (`bench/bench_s3_reads.py`: 12 with runs). A shard
task tells its reader which ranges it is about to read (`RangeReader.expect`); `plan_runs` finds
those that are small and lie byte to byte next to each other in one file, and the first read
inside such a run fetches all of it (`RunCache`): the other reads of the run are cut from those
bytes, or wait for them while they are on the way.

Nothing is fetched that was not expected (runs never reach over a gap), a run is at most `RUN_MAX`
bytes, and fetched runs are kept up to `KEEP_MAX` bytes, the oldest dropped first: a dropped run is
fetched again if a read needs it, so the cap bounds memory, never correctness.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import TypeVar

SMALL = 1 << 20     # ranges at least this big get a GET of their own (the request is cheap beside them)
RUN_MAX = 4 << 20   # the most one run's GET reads
KEEP_MAX = 16 << 20  # fetched runs a reader keeps at once

Range = tuple[int, int]
T = TypeVar("T")


def join_ranges(items: Iterable[T], span: Callable[[T], Range], gap: int, most: int
                ) -> list[tuple[int, int, list[T]]]:
    """`items` in order of their byte ranges (`span(item)` = (start, end)), joined into runs
    (start, end, members): an item that starts at most `gap` bytes past a run's end joins it while
    the run stays within `most` bytes. Reads that merge neighbours use it (here, Megatron-Core's
    chunk reads, the scale preflight)."""
    runs: list[tuple[int, int, list[T]]] = []
    for item in sorted(items, key=span):
        start, end = span(item)
        if runs and start - runs[-1][1] <= gap and max(runs[-1][1], end) - runs[-1][0] <= most:
            first, last, members = runs[-1]
            members.append(item)
            runs[-1] = (first, max(last, end), members)
        else:
            runs.append((start, end, [item]))
    return runs


def plan_runs(ranges: Iterable[tuple[str, int, int]], small: int = SMALL, most: int = RUN_MAX
              ) -> dict[str, list[Range]]:
    """file → runs [start, end) of at least two of `ranges` (file, start, end), each under `small`
    bytes, that touch or overlap, a run at most `most` bytes; sorted, disjoint."""
    by_file: dict[str, set[Range]] = defaultdict(set)
    for name, start, end in ranges:
        if 0 < end - start < small:
            by_file[name].add((start, end))
    out: dict[str, list[Range]] = {}
    for name, found in by_file.items():
        runs = [(a, b) for a, b, members in join_ranges(found, lambda r: r, 0, most) if len(members) > 1]
        if runs:
            out[name] = runs
    return out


class _Fetch:
    """One run's GET: its bytes once `done` is set (None if it failed)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | None = None


class RunCache:
    """Runs of expected ranges, each fetched once with `fetch(file, start, end)` (which returns
    exactly those bytes or raises), shared by the threads reading them."""

    def __init__(self, fetch: Callable[[str, int, int], bytes], keep: int = KEEP_MAX):
        self._fetch = fetch
        self._keep = keep
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[list[int], list[Range]]] = {}
        self._fetched: OrderedDict[tuple[str, int, int], _Fetch] = OrderedDict()
        self._kept = 0

    def expect(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """The ranges about to be read (in place of those of an earlier call)."""
        runs = {name: ([a for a, _ in found], found) for name, found in plan_runs(ranges).items()}
        with self._lock:
            self._runs = runs

    def read(self, name: str, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of `name` from the run holding them, or None if no run does (or its
        fetch failed: the caller reads the range itself, and meets the error on its own)."""
        run = self._run_of(name, start, end)
        if run is None:
            return None
        data = self._run_bytes(name, run)
        return None if data is None else data[start - run[0]:end - run[0]]

    def _run_of(self, name: str, start: int, end: int) -> Range | None:
        with self._lock:
            starts, runs = self._runs.get(name, ((), ()))
            i = bisect.bisect_right(starts, start) - 1
            if i < 0 or end > runs[i][1]:
                return None
            return runs[i]

    def _run_bytes(self, name: str, run: Range) -> bytes | None:
        key = (name, *run)  # a later `expect` may plan another run from the same offset
        with self._lock:
            entry = self._fetched.get(key)
            mine = entry is None
            if mine:
                entry = self._fetched[key] = _Fetch()
            else:
                self._fetched.move_to_end(key)
        if not mine:
            entry.done.wait()
            return entry.data
        try:
            entry.data = self._fetch(name, *run)
        except BaseException:
            with self._lock:
                self._fetched.pop(key, None)
            raise
        finally:
            entry.done.set()
        with self._lock:
            self._kept += len(entry.data)
            while self._kept > self._keep and len(self._fetched) > 1:
                old_key, old = next(iter(self._fetched.items()))
                if not old.done.is_set():  # the oldest still on its way: leave the rest too
                    break
                del self._fetched[old_key]
                self._kept -= len(old.data or b"")
        return entry.data

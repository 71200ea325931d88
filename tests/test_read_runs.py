"""Small neighbouring ranges of an object store come with one GET per run (storage/read_runs.py):
the pure planner, the shared cache under threads, and a shard read from moto's S3."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ckptflow.storage.read_runs import RunCache, plan_runs

from .test_s3 import GetObjectCounter, _put_safetensors

KiB, MiB = 1 << 10, 1 << 20


def test_runs_join_only_small_ranges_that_touch_and_stay_under_the_cap():
    ranges = [("a", 0, 10), ("a", 10, 30), ("a", 30, 40),  # three side by side: one run
              ("a", 41, 50), ("a", 50, 60),                # a one-byte gap: a run of their own
              ("a", 60, 60 + 2 * MiB),                     # big: a GET of its own, and it splits
              ("a", 60 + 2 * MiB, 70 + 2 * MiB),           # ... this one off alone: no run of one
              ("b", 5, 15), ("b", 5, 15), ("b", 10, 20),   # repeats and overlaps join
              ("c", 0, 100)]
    assert plan_runs(ranges) == {"a": [(0, 40), (41, 60)], "b": [(5, 20)]}
    # A run stops before passing `most` bytes and the next one starts there.
    chain = [("f", i * 300 * KiB, (i + 1) * 300 * KiB) for i in range(10)]
    assert plan_runs(chain, most=MiB) == {"f": [(0, 900 * KiB), (900 * KiB, 1800 * KiB), (1800 * KiB, 2700 * KiB)]}
    assert plan_runs([("f", 0, 0), ("f", 0, 0)]) == {}


def test_one_fetch_per_run_whatever_the_threads_and_a_failed_fetch_fails_no_other_read():
    data = bytes(range(256)) * 64
    calls: list[tuple[str, int, int]] = []
    gate = threading.Event()

    def fetch(name, start, end):
        calls.append((name, start, end))
        gate.wait(5)  # every reader arrives while the run is on its way
        if name == "bad":
            raise OSError("connection reset")
        return data[start:end]

    cache = RunCache(fetch)
    cache.expect([("f", i * 100, (i + 1) * 100) for i in range(100)] + [("bad", 0, 10), ("bad", 10, 20)])
    got: dict[int, bytes | None] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, cache.read("f", i * 100 + 3, i * 100 + 50)))
               for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert calls == [("f", 0, 10_000)]
    assert all(got[i] == data[i * 100 + 3:i * 100 + 50] for i in range(32))
    assert cache.read("f", 50, 10_001) is None and cache.read("g", 0, 10) is None  # not inside a run
    # The read that made the failed fetch gets its error; one waiting on it reads by itself (None).
    gate.clear()
    waiter: list[bytes | None] = []
    t = threading.Thread(target=lambda: (time.sleep(0.1), waiter.append(cache.read("bad", 10, 20))))
    t.start()
    threading.Timer(0.3, gate.set).start()
    with pytest.raises(OSError, match="connection reset"):
        cache.read("bad", 0, 10)
    t.join()
    assert waiter == [None]
    gate.set()
    with pytest.raises(OSError):  # nothing of the failure was kept: the next read fetches again
        cache.read("bad", 0, 10)
    assert calls.count(("bad", 0, 20)) == 2


def test_fetched_runs_are_kept_up_to_the_cap_and_fetched_again_after():
    calls: list[int] = []

    def fetch(name, start, end):
        calls.append(start)
        return bytes(end - start)

    # Three runs of 1 KB (a byte apart) with room for 2.5 KB: the third run's fetch drops the first.
    cache = RunCache(fetch, keep=2500)
    cache.expect([("f", a + k, a + k + 500) for a in (0, 1001, 2002) for k in (0, 500)])
    for start in (0, 1001, 2002, 1001, 0):
        assert len(cache.read("f", start + 5, start + 15)) == 10
    assert calls == [0, 1001, 2002, 0]
    assert cache._kept <= 2500


def test_a_shard_from_s3_reads_side_by_side_tensors_in_one_get(s3_options, tmp_path):
    """write_shard from a bucket: 64 small tensors next to each other cost one GET, the big one its
    own chunked GETs, and the bytes written are those of a local read."""
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
    from ckptflow.tasks.run.execute import write_shard
    from ckptflow.storage.reader import read_header

    bucket = s3_options["bucket"]
    opts = {**s3_options["options"], "skip_instance_cache": True}
    src = open_location(f"s3://{bucket}/m", opts)
    tensors = {f"t{i:02d}": np.full(100 + i, i, np.float32) for i in range(64)}
    tensors["w"] = np.arange(3 * MiB, dtype=np.float32)  # 12 MiB: reads of its own
    body = _put_safetensors(src.fs, f"{bucket}/m/x.safetensors", tensors)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "x.safetensors").write_bytes(body)
    header = read_header(src, "x.safetensors")

    def plan() -> ShardPlan:
        refs = [SourceRef.of("x.safetensors", header.tensors[n]) for n in sorted(tensors)]
        return ShardPlan("out.safetensors", tuple(OutputTensor(r.name, r.dtype, r.shape, "copy", (r,)) for r in refs))

    counter = GetObjectCounter(src.fs)
    write_shard(plan(), src, open_location(str(tmp_path / "from-s3")))
    small = [n for n in counter.calls if n < MiB]
    assert len(small) == 1 and small[0] == sum(t.nbytes for n, t in tensors.items() if n != "w")
    assert sum(counter.calls) == len(body) - header.data_start
    write_shard(plan(), open_location(str(tmp_path / "local")), open_location(str(tmp_path / "from-local")))
    assert (tmp_path / "from-s3" / "out.safetensors").read_bytes() == \
        (tmp_path / "from-local" / "out.safetensors").read_bytes()


def test_a_new_expectation_never_serves_bytes_of_an_earlier_run():
    data = bytes(range(200))
    cache = RunCache(lambda name, start, end: data[start:end])
    cache.expect([("f", 0, 10), ("f", 10, 20)])
    assert cache.read("f", 0, 5) == data[0:5]
    cache.expect([("f", 0, 10), ("f", 10, 20), ("f", 20, 100)])  # a longer run from the same offset
    assert cache.read("f", 50, 100) == data[50:100]

"""A progress sink per conversion: two conversions running at once in one process (what a `watch`
run does with `max_concurrent` 2) each count their own shards and bytes."""
from __future__ import annotations

import threading

from ckptflow.flows.params import Recipe
from ckptflow.flows.preflight import plan_conversion
from ckptflow.storage.urls import open_location
from ckptflow.tasks.run import progress
from ckptflow.tasks.run.engine import EngineHooks, run_conversion
from ckptflow.tasks.run.submit import ThreadSubmitter


def test_two_conversions_at_once_count_apart(demo_ckpt, tmp_path, monkeypatch):
    import ckptflow.tasks.run.shard as shard_mod

    real = shard_mod.write_shard
    both_running = threading.Barrier(2, timeout=60)
    seen: set[int] = set()
    seen_lock = threading.Lock()

    def write_shard(*args, **kwargs):
        # The first shard of each conversion waits for the other's: both are in flight at once.
        # A shard that found no sink of its own (None) would be one party short: the barrier breaks.
        sink = progress._current.get()
        with seen_lock:
            first = id(sink) not in seen
            seen.add(id(sink))
        if first:
            both_running.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_mod, "write_shard", write_shard)
    src = open_location(str(demo_ckpt))
    # Different recipes: different shard and byte totals, so counts that mixed could not match.
    plans = {"dequant": plan_conversion(src, Recipe(dequant=True)),
             "dequant+mp2": plan_conversion(src, Recipe(dequant=True, mp=2))}
    assert plans["dequant"].total_shards != plans["dequant+mp2"].total_shards
    sinks = {name: progress.ProgressSink() for name in plans}
    errors: list[BaseException] = []

    def convert(name: str) -> None:
        planned, sink = plans[name], sinks[name]
        sink.set_totals(planned.total_bytes, planned.total_shards)
        submitter = ThreadSubmitter(2)
        try:
            run_conversion(planned.ckpt, planned.engine_passes(), src, open_location(str(tmp_path / name)),
                           str(tmp_path / f"work-{name}"), submitter=submitter, hooks=EngineHooks(progress=sink))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            submitter.close()

    threads = [threading.Thread(target=convert, args=(name,)) for name in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for name, planned in plans.items():
        sink = sinks[name]
        assert sink.counts() == (planned.total_shards, planned.total_shards), name
        assert sink.bytes == planned.total_bytes, name  # every tensor byte its own shards wrote, no other's
    assert progress._current.get() is None  # nothing leaked into the caller's context


def test_bytes_of_shard_work_outside_a_conversion_go_nowhere():
    """No sink in this context (a worker process, a script): counting is a no-op, not a shared total."""
    progress.add_bytes(10)
    progress.shard_done()
    sink = progress.ProgressSink()
    with progress.reporting_to(sink):
        progress.add_bytes(10)
        progress.shard_done()
    progress.add_bytes(5)
    assert (sink.bytes, sink.counts()) == (10, (1, 0))

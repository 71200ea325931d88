"""The commit journal decides reuse inside the shard task too: a task run again after its shard
committed (a retry, or Dask resubmitting the tasks of a worker it lost) does not compute it again."""
from __future__ import annotations

import os

import pytest
from prefect.logging import disable_run_logger

import ckptflow.tasks.run.shard as shard_module
import ckptflow.tasks.run.shard_task as shard_task
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.dequant import plan_dequant


def test_a_resubmitted_shard_task_reuses_what_its_first_attempt_committed(demo_ckpt, tmp_path, monkeypatch):
    src = open_location(str(demo_ckpt))
    ckpt = scan_checkpoint(src)
    plan = plan_dequant(ckpt)
    shard = plan.shards[0]
    fps = [ckpt.fingerprint(f) for f in shard.source_files]
    dst, journal = tmp_path / "out", tmp_path / "work" / "journal"
    args = (plan.stage, shard, str(demo_ckpt), str(dst), fps, None, False, "cpu", "auto", str(journal))
    with disable_run_logger():
        first = shard_task.write_shard_task.fn(*args)
        assert "reused" not in first
        before = os.stat(dst / shard.file)

        def recompute(*a, **k):
            raise AssertionError("a committed shard was computed again")

        monkeypatch.setattr(shard_module, "write_shard", recompute)
        again = shard_task.write_shard_task.fn(*args)  # the resubmission: proven by the journal
        assert again["reused"] is True and again["sha256"] == first["sha256"] and again["size"] == first["size"]
        after = os.stat(dst / shard.file)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)

        # A file that is no longer the one committed is not vouched for: the task computes it again.
        with open(dst / shard.file, "r+b") as f:
            f.seek(before.st_size - 1)
            f.write(b"\x01")
        with pytest.raises(AssertionError, match="computed again"):
            shard_task.write_shard_task.fn(*args)


def test_a_run_that_takes_over_a_dead_runs_lock_marks_its_flow_run_crashed(prefect_harness, demo_ckpt, tmp_path):
    """A SIGKILLed run leaves its lock record (and its flow run "Running"); the next run on that DEST
    takes the lock and marks the dead run Crashed."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from ckptflow.flows.convert import convert_flow
    from ckptflow.storage.lock import LOCK_NAME

    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(convert_flow, parameters={}, state=Running())
        alive = client.create_flow_run(convert_flow, parameters={}, state=Running())
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"flow_run_id": str(dead.id), "host": "gone", "pid": 4_000_000,
                                             "since": "2026-12-06 10:00:00", "token": "x", "heartbeat": 0}))
    convert_flow(str(demo_ckpt), str(out), work=str(tmp_path / "work"), dequant=True)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(dead.id).state.type.value == "CRASHED"
        assert "took over DEST's lock" in client.read_flow_run(dead.id).state.message
        assert client.read_flow_run(alive.id).state.type.value == "RUNNING"  # only the lock's holder
    assert not (out / LOCK_NAME).exists()

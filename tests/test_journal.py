"""The commit journal decides reuse inside the shard task too: a task run again after its shard
committed (a retry, or Dask resubmitting the tasks of a worker it lost) does not compute it again."""
from __future__ import annotations

import os

import pytest
from prefect.logging import disable_run_logger

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

        monkeypatch.setattr(shard_task, "write_shard", recompute)
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

"""Zero shards redone after a kill at any instant of a shard's commit.

A forked child runs the real shard task body (write, fsync, journal entry before the rename,
rename, directory fsync, final journal entry) and is SIGKILLed at one instant of it; the parent
then makes the resume decision `run_shards` makes (`reusable`) and writes the shard again only
if that says so. Whenever the shard was already visible under its final name it must be reused:
same inode, same mtime, same bytes. Forks, not CLI runs, so a hundred kills take seconds.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from ckptflow.tasks.run.journal import reusable
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.files import list_files
from ckptflow.storage.listing import file_identity
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.run.resume import shard_key
from ckptflow.tasks.run.shard_task import write_shard_task

# Where the child dies: right after the shard's rename, after the directory fsync that makes it
# durable, right after the final journal entry lands, or at a random time during the write.
AFTER_RENAME, AFTER_DIR_FSYNC, AFTER_FINAL_ENTRY = "rename", "fsync", "final"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(stage: str, shard, src: str, dst: str, fps, journal: str, when) -> None:
    """Runs in the forked child; never returns."""
    try:
        import ckptflow.storage.writer as writer
        import ckptflow.tasks.kernels.fp8_cpu as fp8_cpu

        fp8_cpu._pool = None  # the parent's dequant threads do not exist in a fork

        final = os.path.join(dst, shard.file)
        real_replace, real_fsync_dir = os.replace, writer.fsync_dir

        def replace(a, b):
            real_replace(a, b)
            if (when == AFTER_RENAME and os.fspath(b) == final) or \
                    (when == AFTER_FINAL_ENTRY and os.fspath(b).startswith(journal) and os.path.exists(final)):
                _die()

        def fsync_dir(path):
            real_fsync_dir(path)
            if when == AFTER_DIR_FSYNC and os.path.abspath(path) == os.path.abspath(dst):
                _die()

        os.replace, writer.fsync_dir = replace, fsync_dir
        if isinstance(when, float):
            import threading

            threading.Timer(when, _die).start()
        write_shard_task.fn(stage, shard, src, dst, fps, None, False, "cpu", "auto", journal)
    except BaseException:  # noqa: BLE001 - get_run_logger has no run here; the work is done
        pass
    os._exit(0)


@pytest.mark.slow
def test_a_kill_at_any_instant_of_a_commit_redoes_no_published_shard(demo_ckpt, tmp_path):
    src = open_location(str(demo_ckpt))
    ckpt = scan_checkpoint(src)
    plan = plan_dequant(ckpt)
    shard = next(s for s in plan.shards if {t.transform for t in s.tensors} == {"copy", "dequant_fp8"})
    fps = [ckpt.fingerprint(f) for f in shard.source_files]
    ref = tmp_path / "ref"
    write_shard(shard, src, open_location(str(ref)))
    want = (ref / shard.file).read_bytes()

    t0 = time.perf_counter()
    write_shard(shard, src, open_location(str(tmp_path / "timing")))
    span = time.perf_counter() - t0
    rng = random.Random(15)
    instants = [AFTER_RENAME, AFTER_DIR_FSYNC, AFTER_FINAL_ENTRY] * 8 + [rng.uniform(0, 1.5 * span) for _ in range(30)]
    seen = {"published": 0, "unpublished": 0}
    for k, when in enumerate(instants):
        dst, journal = tmp_path / f"d{k}", tmp_path / f"j{k}"
        pid = os.fork()
        if pid == 0:
            _child(plan.stage, shard, str(demo_ckpt), str(dst), fps, str(journal), when)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
        dloc, jloc = open_location(str(dst)), open_location(str(journal))
        before = os.stat(dst / shard.file) if (dst / shard.file).exists() else None
        if not isinstance(when, float):
            assert before is not None and os.WIFSIGNALED(status), when  # the kill came after the rename
        entry = f"{shard_key(plan.stage, shard, fps, str(dst))}.json"
        journaled = set(list_files(jloc)) if journal.exists() else set()
        record = reusable(jloc, entry, file_identity(dloc, shard.file), journaled)
        if before is None:
            seen["unpublished"] += 1
            assert record is None
            write_shard(shard, src, dloc)  # the rerun writes what was never published
        else:
            seen["published"] += 1
            assert record is not None, (when, sorted(journaled))  # visible ⇒ proven: not redone
            after = os.stat(dst / shard.file)
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
            # and proven again on the next run, by the entry `reusable` completed
            assert reusable(jloc, entry, file_identity(dloc, shard.file), set(list_files(jloc))) is not None
        assert (dst / shard.file).read_bytes() == want
        assert not [p for p in Path(dst).iterdir() if ".partial-" in p.name] or before is None
    print(seen, f"{span:.3f}s a shard")
    assert seen["published"] >= 24, seen

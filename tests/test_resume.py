"""Resume after SIGKILL: committed shards are cache hits, the rest recompute, bytes identical."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from .helpers import PYTHON, ROOT, cli_env, dequant_reference, run_passes, sigkill_when, tree

# The child runs the real CLI; only a pause before each shard is added so the kill lands mid-run.
SLOW_CHILD = """
import sys, time
import ckptflow.tasks.run.shard as st
real = st.write_shard
def slow(*a, **k):
    time.sleep(0.8)
    return real(*a, **k)
st.write_shard = slow
from ckptflow.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(prefect_harness, demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["convert", str(demo_ckpt), str(out), "--dequant", "--work", str(work), "--max-workers", "1", "--json"]
    child = subprocess.Popen([PYTHON, "-c", SLOW_CHILD, *args], cwd=ROOT, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sigkill_when(child, lambda: len(list(out.glob("*.safetensors"))) >= 2)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert 2 <= len(committed) < 6
    assert not (out / "model.safetensors.index.json").exists()  # nothing claims the checkpoint complete
    mtimes = {n: (out / n).stat().st_mtime_ns for n in committed}

    rerun = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["cached_shards"] == len(committed)
    assert summary["shards"] - summary["cached_shards"] == 6 - len(committed)  # recomputed shards
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == mtimes  # not rewritten
    assert not [p for p in out.iterdir() if ".partial-" in p.name]  # the killed temp file is gone

    clean = tmp_path / "clean"
    dequant_reference(demo_ckpt, clean, tmp_path / "work-clean")
    assert tree(out) == tree(clean)


@pytest.mark.slow
def test_sigkill_during_the_single_dequant_mp_pass_resumes_exactly(demo_ckpt, tmp_path):
    """--dequant --mp 4 is one pass (rank files straight from FP8): killed after a rank file, the
    rerun reuses it, writes the others, and equals the two passes byte for byte."""
    from ckptflow.flows.params import Recipe

    out, work = tmp_path / "out", tmp_path / "work"
    env = cli_env(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # a loaded CI box starts it slowly
    args = ["convert", str(demo_ckpt), str(out), "--dequant", "--mp", "4", "--work", str(work),
            "--max-workers", "1", "--json"]
    child = subprocess.Popen([PYTHON, "-c", SLOW_CHILD, *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sigkill_when(child, lambda: bool(list(out.glob("*.safetensors"))))
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert 1 <= len(committed) < 4
    assert not (work / "stages").exists()  # no intermediate checkpoint, even mid-run
    mtimes = {n: (out / n).stat().st_mtime_ns for n in committed}
    rerun = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["shards"], summary["cached_shards"]) == (4, len(committed))
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == mtimes
    two = tmp_path / "two"
    run_passes(demo_ckpt, two, tmp_path / "w2", Recipe(dequant=True, mp=4), fuse=False)
    assert tree(out) == tree(two)

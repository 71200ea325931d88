"""Resume after SIGKILL: committed shards are cache hits, the rest recompute, bytes identical."""
from __future__ import annotations

import json

import pytest

from .helpers import cli_env, dequant_reference, engine_convert, kill_slow_cli, run_main, tree


def rerun_json(args: list[str]) -> dict:
    """The rerun after the kill, as `main(argv)` in this process (`run_main`): the run that dies is
    a real process, SIGKILLed; what resumes is the CLI's code, the same in a process or here, less
    the ~3 s of CPU a new process spends importing torch and Prefect."""
    run = run_main(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])



@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(prefect_harness, demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["convert", str(demo_ckpt), str(out), "--dequant", "--work", str(work), "--max-workers", "1", "--json"]
    kill_slow_cli(args, lambda: len(list(out.glob("*.safetensors"))) >= 2)
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert 2 <= len(committed) < 6
    assert not (out / "model.safetensors.index.json").exists()  # nothing claims the checkpoint complete
    mtimes = {n: (out / n).stat().st_mtime_ns for n in committed}

    summary = rerun_json(args)
    assert summary["cached_shards"] == len(committed)
    assert summary["shards"] - summary["cached_shards"] == 6 - len(committed)  # recomputed shards
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == mtimes  # not rewritten
    assert not [p for p in out.iterdir() if ".partial-" in p.name]  # the killed temp file is gone

    clean = tmp_path / "clean"
    dequant_reference(demo_ckpt, clean, tmp_path / "work-clean")
    assert tree(out) == tree(clean)


@pytest.mark.slow
def test_sigkill_during_the_single_dequant_mp_pass_resumes_exactly(prefect_harness, demo_ckpt, tmp_path):
    """--dequant --mp 4 is one pass (rank files straight from FP8): killed after a rank file, the
    rerun reuses it, writes the others, and equals the two passes byte for byte."""

    out, work = tmp_path / "out", tmp_path / "work"
    env = cli_env(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # a loaded CI box starts it slowly
    args = ["convert", str(demo_ckpt), str(out), "--dequant", "--mp", "4", "--work", str(work),
            "--max-workers", "1", "--json"]
    kill_slow_cli(args, lambda: bool(list(out.glob("*.safetensors"))), env)
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert 1 <= len(committed) < 4
    assert not (work / "stages").exists()  # no intermediate checkpoint, even mid-run
    mtimes = {n: (out / n).stat().st_mtime_ns for n in committed}
    summary = rerun_json(args)
    assert (summary["shards"], summary["cached_shards"]) == (4, len(committed))
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == mtimes
    two = tmp_path / "two"
    engine_convert(demo_ckpt, two, tmp_path / "w2", fuse=False, dequant=True, mp=4)
    assert tree(out) == tree(two)

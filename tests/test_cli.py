"""The CLI as a user meets it: exit codes, one-line errors naming the tensor, no traceback."""
from __future__ import annotations

import json
import subprocess

import pytest

from .helpers import PYTHON, ROOT, cli_env


def ckptflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_convert_bad_input_is_one_line_error_and_nothing_complete(demo_ckpt, tmp_path):
    index = json.loads((demo_ckpt / "model.safetensors.index.json").read_text())
    victim = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    del index["weight_map"][victim]  # the index no longer lists a scale its file still holds
    (demo_ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    run = ckptflow("convert", str(demo_ckpt), str(out), "--dequant", "--work", str(tmp_path / "w"))
    assert run.returncode == 2
    first = run.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and "problem(s) found; nothing was converted" in first
    assert f"tensor '{victim}': in this file but not in model.safetensors.index.json" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert not out.exists() or not (out / "model.safetensors.index.json").exists()


def test_usage_errors(tmp_path):
    run = ckptflow("convert", str(tmp_path), str(tmp_path / "o"))
    assert run.returncode == 2 and run.stderr.startswith("error: nothing to do")
    run = ckptflow("validate", str(tmp_path / "nope"))
    assert run.returncode == 2 and "nope: no files found" in run.stderr and "Traceback" not in run.stderr
    run = ckptflow("convert", str(tmp_path), str(tmp_path / "o"), "--dequant", "--storage-options", "{bad")
    assert run.returncode == 2 and "--storage-options is not valid JSON" in run.stderr


def test_bad_option_values_are_one_line_errors_before_prefect_starts(tmp_path):
    run = ckptflow("convert", str(tmp_path), str(tmp_path / "o"), "--dequant", "--mp", "0", "--device", "tpu",
                   "--max-shard-size", "5 furlongs")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "error: invalid option: --max-shard-size: '5 furlongs' is not valid (largest output shard, e.g. 5GB "
        "(5·10⁹ bytes), 500MB, 1.5GiB (2³⁰-based) or a number of bytes); --mp: Input should be greater than or "
        "equal to 1; --device: 'tpu' is not valid (where to dequantize: auto (CUDA if visible), cpu, cuda[:N])"]
    run = ckptflow("watch", str(tmp_path), str(tmp_path / "o"), "--dequant", "--max-concurrent", "0")
    assert run.returncode == 2 and "--max-concurrent: must be 1 or more, got 0" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_watch_converts_each_checkpoint_under_a_prefix(tmp_path):
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    for name in ("m1", "m2"):
        make_deepseek_v3_fp8(open_location(str(tmp_path / "in" / name)))
    (tmp_path / "in" / "README.md").write_text("not a checkpoint")
    run = ckptflow("watch", str(tmp_path / "in"), str(tmp_path / "out"), "--dequant", "--settle-seconds", "0", "--json")
    assert run.returncode == 0, run.stderr
    # --json: stdout is the JSON document alone; the rows a person reads are on stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith(("m1 ", "m2 "))]
    assert lines[0].split() == ["m1", "convert", "new", "→", "6", "shards", "(0", "reused)"]
    assert lines[1].split()[:3] == ["m2", "convert", "new"]
    summary = json.loads(run.stdout)
    assert [c["result"]["shards"] for c in summary["checkpoints"]] == [6, 6]
    for name in ("m1", "m2"):
        config = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert config["torch_dtype"] == "bfloat16"
        assert (tmp_path / "out" / ".ckptflow-work" / name / "watch.json").is_file()

"""The CLI as a user meets it: exit codes, one-line errors naming the tensor, no traceback."""
from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import PYTHON, ROOT, cli_env


def ckptflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "flows.cli", *args], cwd=ROOT, env=cli_env(), capture_output=True,
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

"""Validation: every index ↔ header problem is reported at once, each naming file and tensor."""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.validate import ValidationFailed, find_problems, raise_on_errors

from .helpers import PYTHON, ROOT, cli_env


def raw_file(path: Path, header: dict, data_len: int, header_len: int | None = None) -> None:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + b"\0" * data_len)


def good(tmp_path: Path) -> Path:
    """Two shards + index, all consistent."""
    save_file({"a.weight": torch.ones(4, 4), "a.bias": torch.zeros(4)}, tmp_path / "m-1.safetensors")
    save_file({"b.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, tmp_path / "m-2.safetensors")
    write_index(tmp_path, {"a.weight": "m-1.safetensors", "a.bias": "m-1.safetensors",
                           "b.weight": "m-2.safetensors"}, 64 + 16 + 12)
    return tmp_path


def write_index(path: Path, weight_map: dict, total: int | None) -> None:
    meta = {} if total is None else {"total_size": total}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}))


def problems(path: Path) -> list[str]:
    return [str(p) for p in find_problems(scan_checkpoint(open_location(str(path)))) if p.severity == "error"]


def test_consistent_checkpoint_passes(tmp_path):
    assert problems(good(tmp_path)) == []


def test_single_file_without_index_is_fine(tmp_path):
    save_file({"x": torch.ones(3)}, tmp_path / "model.safetensors")
    assert problems(tmp_path) == []


def test_many_files_without_index_is_an_error(tmp_path):
    good(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    [msg] = problems(tmp_path)
    assert "model.safetensors.index.json" in msg and "2 .safetensors files" in msg


def test_every_index_problem_reported_at_once(tmp_path):
    good(tmp_path)
    save_file({"c.weight": torch.ones(2), "a.bias": torch.zeros(4)}, tmp_path / "m-3.safetensors")
    write_index(tmp_path, {"a.weight": "m-1.safetensors", "a.bias": "m-1.safetensors",
                           "b.weight": "m-2.safetensors", "ghost.weight": "m-2.safetensors",
                           "lost.weight": "m-9.safetensors"}, 999)
    found = problems(tmp_path)
    text = "\n".join(found)
    assert "m-9.safetensors: listed in model.safetensors.index.json for 1 tensor(s) but the file is missing" in text
    assert "m-2.safetensors: tensor 'ghost.weight': listed in model.safetensors.index.json but not in this file" in text
    assert "m-3.safetensors: tensor 'c.weight': in this file but not in model.safetensors.index.json" in text
    assert "tensor 'a.bias': appears in 2 files: m-1.safetensors, m-3.safetensors" in text
    assert "metadata.total_size is 999 but the tensors hold" in text
    assert len(found) >= 5


@pytest.mark.parametrize("case, expect", [
    ("not_json", "header is not valid JSON"),
    ("too_long", "runs past the end of the file"),
    ("overlap", "tensor 'y': data overlaps the previous tensor's bytes"),
    ("out_of_bounds", "truncated: the header's data runs to byte"),
    ("size_mismatch", "tensor 'x': holds 8 bytes but F32 × [3] needs 12"),
    ("unknown_dtype", "tensor 'x': unknown dtype 'F12'"),
    ("tiny", "too short for a safetensors header"),
    ("malformed", "tensor 'x' has a malformed entry"),
])
def test_header_problems_name_file_and_tensor(tmp_path, case, expect):
    f = tmp_path / "model.safetensors"
    if case == "not_json":
        f.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    elif case == "too_long":
        raw_file(f, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, header_len=10_000)
    elif case == "overlap":
        raw_file(f, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12)
    elif case == "out_of_bounds":
        raw_file(f, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 10)
    elif case == "size_mismatch":
        raw_file(f, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8)
    elif case == "unknown_dtype":
        raw_file(f, {"x": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, 8)
    elif case == "tiny":
        f.write_bytes(b"\x01\x02")
    elif case == "malformed":
        raw_file(f, {"x": {"dtype": "F32", "shape": [2]}}, 8)
    found = problems(tmp_path)
    assert any(m.startswith("model.safetensors: ") and expect in m for m in found), found


def test_check_raises_with_every_error_and_keeps_warnings(tmp_path):
    good(tmp_path)
    write_index(tmp_path, {"a.weight": "m-1.safetensors", "a.bias": "m-1.safetensors",
                           "b.weight": "m-2.safetensors"}, None)
    warnings = raise_on_errors(scan_checkpoint(open_location(str(tmp_path))))
    assert [str(w) for w in warnings] == ["model.safetensors.index.json: has no metadata.total_size"]
    (tmp_path / "m-2.safetensors").unlink()
    with pytest.raises(ValidationFailed) as err:
        raise_on_errors(scan_checkpoint(open_location(str(tmp_path))))
    assert "m-2.safetensors" in str(err.value) and "nothing was converted" in str(err.value)


def test_validate_cli_exit_codes_and_messages(tmp_path):
    (tmp_path / "ok").mkdir()
    ok = good(tmp_path / "ok")
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "validate", str(ok)], capture_output=True,
                         text=True, env=cli_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ok — 2 file(s), 3 tensors" in run.stdout
    (ok / "m-1.safetensors").write_bytes((ok / "m-1.safetensors").read_bytes()[:40])
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "validate", str(ok)], capture_output=True,
                         text=True, env=cli_env(), cwd=ROOT)
    assert run.returncode == 1
    assert "error: m-1.safetensors: header length" in run.stderr
    assert "Traceback" not in run.stderr

"""The CLI as a user meets it: exit codes, one-line errors naming the tensor, no traceback."""
from __future__ import annotations

import json
import subprocess

import pytest

from .helpers import PYTHON, ROOT, cli_env, run_main

# What the CLI parses, refuses and prints is tested through `main(argv)` in this process
# (helpers.run_main): a new process would spend ~3 s of CPU importing Prefect and torch first.
ckptflow = run_main


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
def test_watch_converts_each_checkpoint_under_a_prefix(prefect_harness, tmp_path):
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


# A fresh interpreter runs `ckptflow ARGS` (console_main, as the script does) for each case, with
# the case's modules blocked by a meta-path finder that records every attempt to import them (an
# `import torch` inside a try/except would be recorded too, not just one that fails the command).
BLOCKED_CLI = r'''
import contextlib, importlib.abc, io, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    blocked, tried = (), []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            self.tried.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

blocker = Blocker()
sys.meta_path.insert(0, blocker)
from ckptflow.flows.cli import console_main

results = []
for blocked, args in json.loads(sys.argv[1]):
    blocker.blocked, blocker.tried = tuple(blocked), []
    sys.argv = ["ckptflow", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = console_main()
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
        except Exception as exc:  # a blocked import the command could not do without
            code = f"raised {exc!r}"
    results.append({"code": code, "tried": sorted(set(blocker.tried)), "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
'''


def test_commands_that_need_neither_prefect_nor_torch_import_neither(demo_ckpt, tmp_path):
    """--help, usage errors, refused input, dry runs, inspect, validate and verify answer without
    Prefect (~1.3 s of CPU to import) or torch (~1.5 s): a user's refusal in a fraction of a second.
    A Megatron save's dry run reads torch pickles (common.pt, rank files) but never needs Prefect."""
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    mcore = ROOT / "tests" / "data" / "mcore" / "llama-gqa-tp1"
    out = tmp_path / "out"
    (tmp_path / "gpt2.pt").write_bytes(b"not a checkpoint")
    make_deepseek_v3_fp8(open_location(str(tmp_path / "in" / "m1")))
    both, prefect = ["prefect", "torch"], ["prefect"]
    cases = {
        "help": (both, ["--help"], 0, "usage: ckptflow"),
        "usage": (both, ["convert", str(demo_ckpt)], 2, "the following arguments are required: dest"),
        "no stage": (both, ["convert", str(demo_ckpt), str(out)], 2, "error: nothing to do"),
        "missing": (both, ["convert", str(tmp_path / "nope"), str(out), "--dequant"], 2, "no files found"),
        "bad option": (both, ["convert", str(demo_ckpt), str(out), "--dequant", "--mp", "0"], 2, "--mp:"),
        "dry run": (both, ["convert", str(demo_ckpt), str(out), "--dequant", "--mp", "2", "--dry-run"], 0,
                    "dry run: dequant+mp of"),
        "watch dry run": (both, ["watch", str(tmp_path / "in"), str(out), "--dequant", "--dry-run",
                                 "--settle-seconds", "0"], 0, "m1"),
        "inspect": (both, ["inspect", str(demo_ckpt)], 0, "--dequant would write"),
        "validate": (both, ["validate", str(demo_ckpt)], 0, "index consistent"),
        "verify": (both, ["verify", str(demo_ckpt)], 0, "scale grids fit"),
        "mcore dry run": (prefect, ["megatron", str(mcore / "torch_dist"), str(out), "--dry-run"], 0,
                          "dry run: nothing written"),
        "mcore inspect": (prefect, ["inspect", str(mcore / "legacy")], 0, "Megatron-Core legacy"),
        "gpt2 refusal": (prefect, ["megatron", str(tmp_path / "gpt2.pt"), str(out)], 2, "gpt2.pt"),
    }
    run = subprocess.run([PYTHON, "-c", BLOCKED_CLI, json.dumps([c[:2] for c in cases.values()])], cwd=ROOT,
                         env=cli_env(temporary_server=True), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for (name, (blocked, _, code, said)), got in zip(cases.items(), json.loads(run.stdout.splitlines()[-1])):
        text = got["out"] + got["err"]
        assert got["tried"] == [] and got["code"] == code, (name, got["tried"], text[-2000:])
        assert said in text and "Traceback" not in text, (name, text[-2000:])
    assert not out.exists()  # refusals and dry runs wrote nothing

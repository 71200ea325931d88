"""A user's first minutes (issue 14): input errors before Prefect starts, Ctrl-C / SIGTERM that
stop a run and resume it exactly, summaries that count this run only, --dry-run, MP output that
passes ckptflow's own validate and verify."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from ckptflow.flows.convert import convert_flow

from .helpers import PYTHON, ROOT, cli_env, dequant_reference, run_main, tree

# The real CLI (`console_main()`: the handlers are armed, as for `ckptflow …`), with a pause
# before each shard so a signal lands mid-run. Prefect's settings are set before it is imported.
SLOW_CLI = """
import sys, time
from ckptflow.flows.cli import console_main
from ckptflow.flows.cli.entry import _quiet_prefect
_quiet_prefect(False)
import ckptflow.tasks.run.shard as st
real = st.write_shard
def slow(*a, **k):
    time.sleep(0.8)
    return real(*a, **k)
st.write_shard = slow
sys.argv = ["ckptflow"] + sys.argv[1:]
sys.exit(console_main())
"""

# Runs one CLI command in-process and reports which heavy modules it loaded.
PROBE_CLI = """
import json, sys
from ckptflow.flows.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "prefect": "prefect" in sys.modules, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    path = tmp_path_factory.mktemp("first") / "fp8"
    make_deepseek_v3_fp8(open_location(str(path)))
    return path


def _probe(*args: str) -> tuple[subprocess.CompletedProcess, dict, float]:
    t0 = time.monotonic()
    # these runs never reach Prefect (the probe says so): no server named for them
    run = subprocess.run([PYTHON, "-c", PROBE_CLI, *args], cwd=ROOT, env=cli_env(temporary_server=True),
                         capture_output=True, text=True, timeout=120)
    return run, json.loads(run.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def _bad_index(ckpt, tmp_path):
    bad = tmp_path / "bad-index"
    shutil.copytree(ckpt, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00009-of-00006.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    return bad


@pytest.mark.parametrize("case, expect", [
    ("missing", "no files found"),
    ("index", "problem(s) found; nothing was converted"),
    ("preset", "preset nope: no such file and no such built-in preset"),
    ("mp3", "cannot shard"),
])
def test_input_errors_are_one_line_before_prefect_or_torch(ckpt, tmp_path, case, expect):
    source = {"missing": tmp_path / "nothing-here", "index": None}.get(case, ckpt)
    if case == "index":
        source = _bad_index(ckpt, tmp_path)
    extra = {"preset": ["--mp", "2", "--preset", "nope"], "mp3": ["--mp", "3"]}.get(case, [])
    out, work = tmp_path / "out", tmp_path / "work"
    run, loaded, seconds = _probe("convert", str(source), str(out), "--dequant", "--work", str(work), *extra)
    assert loaded["code"] == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], run.stderr
    assert "planned://" not in run.stderr and "Traceback" not in run.stderr
    assert not loaded["prefect"] and not loaded["torch"]  # checked before anything heavy started
    assert not out.exists() and not work.exists()  # nothing written
    assert seconds < 30  # ~0.5 s on an idle 2-core machine; bench/bench_first_minutes.py measures it


def test_watch_dry_run_decides_without_prefect_or_torch(ckpt, tmp_path):
    incoming, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(ckpt, incoming / "org" / "m1")
    (incoming / "notes.txt").write_text("not a checkpoint")
    run, loaded, _ = _probe("watch", str(incoming), str(out), "--dequant", "--dry-run", "--settle-seconds", "0",
                            "--json")
    assert loaded == {"code": 0, "prefect": False, "torch": False}, run.stderr
    assert run.stderr.splitlines()[0].split() == ["org/m1", "convert", "new"]  # --json: the text on stderr
    summary = json.loads(run.stdout.splitlines()[0])  # the probe's own line follows
    assert summary["dry_run"] is True and [c["name"] for c in summary["checkpoints"]] == ["org/m1"]
    assert not out.exists()  # nothing written, not even the work prefix inside DEST_PREFIX
    settling, loaded, _ = _probe("watch", str(incoming), str(out), "--dequant", "--dry-run")
    assert loaded["code"] == 0 and settling.stdout.split()[:2] == ["org/m1", "settling"], settling.stdout
    empty, loaded, _ = _probe("watch", str(tmp_path / "nothing"), str(out), "--dequant", "--dry-run")
    assert loaded["code"] == 2 and "nothing: no such folder or prefix" in empty.stderr


def _interrupted(ckpt, tmp_path, sig: int, group: bool, temporary_server: bool):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["convert", str(ckpt), str(out), "--dequant", "--work", str(work), "--json"]
    env = cli_env(temporary_server=temporary_server)
    child = subprocess.Popen([PYTHON, "-c", SLOW_CLI, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if len(list(out.glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.02)
    sent = time.monotonic()
    (os.killpg if group else os.kill)(child.pid, sig)  # group: a terminal's Ctrl-C reaches every process
    stdout, stderr = child.communicate(timeout=60)
    return child.returncode, time.monotonic() - sent, stdout, stderr, out, args


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, group, temporary_server", [
    # Ctrl-C as most users meet it: on the CLI's own temporary server, which the CLI stops itself
    # (flows/runtime/interrupt.py leave()); SIGTERM on a server that outlives the run (Prefect's own exit).
    (signal.SIGINT, 130, True, True), (signal.SIGTERM, 143, False, False)])
def test_signal_stops_run_then_rerun_resumes_exactly(prefect_harness, ckpt, tmp_path, sig, status, group,
                                                     temporary_server):
    code, took, stdout, stderr, out, args = _interrupted(ckpt, tmp_path, sig, group, temporary_server)
    assert code == status, stderr[-3000:]
    assert took < 10, took  # ~0.2 s idle
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted after ") and lines[-1].endswith(
        " of 6 shards; run the same command again to resume"), stderr[-2000:]
    for noise in ("Traceback", "EventsWorker", "httpx", "ConnectError"):
        assert noise not in stderr + stdout
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert 2 <= len(committed) < 6 and not (out / "model.safetensors.index.json").exists()

    clean = tmp_path / "clean"
    dequant_reference(ckpt, clean, tmp_path / "work-clean")
    want = tree(clean)
    for name in committed:  # no partial file under a final name
        assert (out / name).read_bytes() == want[name]
    rerun = run_main(*args)  # in this process: the interrupted run above is the real process
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["cached_shards"] == len(committed)  # resumes exactly: nothing committed redone
    assert tree(out) == want


@pytest.mark.slow
def test_ctrl_c_on_a_process_pool_run_prints_the_one_line_and_leaves_no_worker(prefect_harness, tmp_path):
    """`--task-runner processes` under a terminal's Ctrl-C (the whole process group): the pool's
    workers leave it to the CLI, so no worker's KeyboardInterrupt traceback and no resource
    tracker's "leaked semaphore" warning follow the one line; no worker outlives the CLI; the
    same command resumes."""
    import psutil

    from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    src, out, work = tmp_path / "src", tmp_path / "out", tmp_path / "work"
    make_deepseek_v3_fp8(open_location(str(src)), DeepSeekDims(num_hidden_layers=12))  # 15 shards
    args = ["convert", str(src), str(out), "--dequant", "--work", str(work), "--task-runner", "processes",
            "--max-workers", "2", "--json"]
    child = subprocess.Popen([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, workers = time.monotonic() + 240, []
    while time.monotonic() < deadline and child.poll() is None and not list(out.glob("*.safetensors")):
        time.sleep(0.02)
    workers = psutil.Process(child.pid).children(recursive=True)
    commands = []
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            commands.append(" ".join(proc.cmdline()))
    os.killpg(child.pid, signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted after ") and lines[-1].endswith(" of 15 shards; run the same "
                                                                          "command again to resume"), stderr
    for noise in ("Traceback", "KeyboardInterrupt", "leaked", "Error"):
        assert noise not in stderr + stdout, stderr
    assert any("multiprocessing.forkserver" in c for c in commands), commands  # the pool had started
    deadline = time.monotonic() + 10  # the orphan watchdog polls every 0.5 s
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                              for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    committed = len(list(out.glob("*.safetensors")))
    assert committed < 15 and not (out / "model.safetensors.index.json").exists()

    rerun = run_main(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["cached_shards"] == committed
    dequant_reference(src, tmp_path / "clean", tmp_path / "work-clean")
    assert tree(out) == tree(tmp_path / "clean")


def test_summary_counts_this_run_only(prefect_harness, ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    fresh = convert_flow(str(ckpt), str(out), work=str(work), dequant=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    assert fresh["cached_shards"] == 0 and fresh["reused_tensors"] == 0 and fresh["reused_bytes"] == 0
    assert fresh["tensors"] == fresh["output_tensors"] == len(index["weight_map"]) == 135
    assert fresh["bytes_written"] == fresh["output_bytes"] == index["metadata"]["total_size"]
    assert fresh["source_bytes"] == sum(r["source_bytes"] for r in fresh["records"]) > 0

    cached = convert_flow(str(ckpt), str(out), work=str(work), dequant=True)
    assert cached["cached_shards"] == 6 and cached["tensors"] == 0
    assert cached["bytes_written"] == 0 and cached["source_bytes"] == 0
    assert cached["reused_tensors"] == 135 and cached["reused_bytes"] == fresh["bytes_written"]

    gone = sorted(sizes)[1:3]
    for name in gone:
        (out / name).unlink()
    resumed = convert_flow(str(ckpt), str(out), work=str(work), dequant=True)
    redone = [r for r in resumed["records"] if not r["cached"]]
    assert sorted(r["name"] for r in redone) == gone
    assert resumed["cached_shards"] == 4 and resumed["tensors"] == sum(r["tensors"] for r in redone)
    assert 0 < resumed["bytes_written"] < fresh["bytes_written"]
    assert resumed["bytes_written"] + resumed["reused_bytes"] == fresh["bytes_written"]
    assert resumed["tensors"] + resumed["reused_tensors"] == 135
    assert [p["shards"] for p in resumed["passes"]] == [6]


@pytest.mark.slow
def test_dry_run_numbers_match_a_real_run(prefect_harness, ckpt, tmp_path):
    from ckptflow.flows.dry_run import dry_run_report
    from ckptflow.flows.preflight import plan_conversion
    from ckptflow.flows.params import ConvertOptions
    from ckptflow.storage.urls import open_location

    out = tmp_path / "mp"
    recipe = ConvertOptions(dequant=True, mp=2).recipe()
    report = dry_run_report(plan_conversion(open_location(str(ckpt)), recipe), str(ckpt), str(out),
                            str(tmp_path / "w"))
    summary = convert_flow(str(ckpt), str(out), mp=2, work=str(tmp_path / "w"), dequant=True)
    assert [p["stage"] for p in report["passes"]] == [p["stage"] for p in summary["passes"]]
    for planned, done in zip(report["passes"], summary["passes"]):
        assert (planned["shards"], planned["tensors"], planned["bytes_in"]) == \
            (done["shards"], done["tensors"], done["source_bytes"])
    assert report["output_bytes"] == summary["output_bytes"] and report["output_tensors"] == summary["output_tensors"]
    assert sorted(report["passes"][-1]["files"]) == sorted(p.name for p in out.glob("*.safetensors"))
    assert report["source_bytes"] == summary["passes"][0]["source_bytes"]
    acts = report["passes"][0]["actions"]
    # one pass: every weight_scale_inv folded into its FP8 weight, and the MTP layer the preset drops
    assert 0 < acts["dequantized"] < acts["dropped"]

    # ckptflow's own MP output passes its own validate and verify (no index, rank files).
    for command, ok in (("validate", "2 model-parallel rank files"), ("verify", "all floating tensors match")):
        run = run_main(command, str(out))
        assert run.returncode == 0 and ok in run.stdout, run.stdout + run.stderr
    (out / "model1-mp2.safetensors").unlink()  # a missing rank is an error, and verify says FAILED
    run = run_main("verify", str(out))
    assert run.returncode == 1 and "1 of 2 rank file(s) missing: model1-mp2.safetensors" in run.stderr
    assert "all floating tensors match" not in run.stdout and "FAILED" in run.stderr


@pytest.mark.slow
def test_dry_run_at_deepseek_v3_scale(tmp_path):
    from ckptflow.flows.demo.synthetic_sparse import make_sparse_deepseek_v3

    src = tmp_path / "ds3"
    made = make_sparse_deepseek_v3(str(src))
    assert made == {"tensors": 91991, "files": 163, "bytes": made["bytes"]} and made["bytes"] > 6.8e11
    dest, hwm = tmp_path / "out", tmp_path / "hwm"
    t0 = time.monotonic()
    run = subprocess.run([PYTHON, str(ROOT / "bench" / "measured_cli.py"), "convert", str(src), str(dest),
                          "--dequant", "--mp", "8", "--dry-run", "--json", "--work", str(tmp_path / "w")],
                         cwd=ROOT, env=cli_env(temporary_server=True, CKPTFLOW_HWM_FILE=str(hwm)),
                         capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not dest.exists() and not (tmp_path / "w").exists()
    assert report["source_tensors"] == 91991 and report["output_shards"] == 8
    assert [p["stage"] for p in report["passes"]] == ["dequant+mp"]  # one pass: no BF16 copy in between
    assert report["passes"][0]["actions"]["dequantized"] > 45000
    assert report["passes"][0]["files"] == [f"model{r}-mp8.safetensors" for r in range(8)]
    # each rank reads its slices, not whole tensors: less than the source (the MTP layer is dropped)
    assert 0.9 * made["bytes"] < report["source_bytes"] < made["bytes"]
    assert int(hwm.read_text()) * 1024 <= 400 * 2**20
    # ≤ 10 s on an idle 2-core machine (measured 10.1 s at load 5); generous under a loaded CI.
    assert seconds < 60, seconds


def test_truncated_shard_is_one_problem_with_its_count(tmp_path):
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.safetensors_format import TensorSpec, build_header
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.validate import find_problems

    specs = [TensorSpec(f"t{i}", "F32", (4,)) for i in range(42)]
    header = build_header(specs, {"format": "pt"})
    (tmp_path / "model.safetensors").write_bytes(header + b"\0" * 16 * 10)  # 10 of 42 tensors present
    found = [str(p) for p in find_problems(scan_checkpoint(open_location(str(tmp_path))))]
    assert len(found) == 1 and "32 of 42 tensor(s) cut (first: 't10')" in found[0], found


def test_the_convert_flow_imports_no_torch_until_a_kernel_needs_it():
    """A reindex, MP or copy run never loads torch (~1-3 s here); dequant and casts load it in their tasks."""
    probe = ("import sys, ckptflow.flows.convert, ckptflow.flows.cli, ckptflow.flows.cli.parser; "
             "from ckptflow.tasks.kernels.device import no_gpu_possible, resolve_device; "
             "print(no_gpu_possible() and resolve_device('auto'), "
             "sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    run = subprocess.run([PYTHON, "-c", probe], cwd=ROOT, env=cli_env(temporary_server=True), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() in (["cpu", "[]"], ["False", "[]"]), run.stdout  # False: a GPU node exists here


def test_device_is_resolved_with_or_without_asking_torch(monkeypatch):
    import torch

    from ckptflow.storage.errors import UserError
    from ckptflow.tasks.kernels import device

    for nodes_absent in (True, False):  # Linux without GPU device nodes, or a machine where torch decides
        monkeypatch.setattr(device, "no_gpu_possible", lambda: nodes_absent)
        visible = not nodes_absent and torch.cuda.is_available()
        assert device.resolve_device("auto") == ("cuda" if visible else "cpu")
        assert device.resolve_device("cpu") == "cpu"
        if not visible:
            with pytest.raises(UserError, match="--device cuda:1: no CUDA device is visible here"):
                device.resolve_device("cuda:1")
    with pytest.raises(UserError, match="--device must be auto, cpu or cuda"):
        device.resolve_device("tpu")


def test_summary_block_is_width_safe_and_names_prefects_share():
    import io

    from ckptflow.flows.summary_text import print_summary

    passes = [{"stage": s, "into": into, "shards": n, "cached_shards": c, "tensors": t, "source_bytes": 10,
               "bytes_written": 20, "actions": {"dequantized": 4, "cast": 2, "copied": 9}}
              for s, into, n, c, t in (("dequant", "work", 6, 6, 0), ("mp", "DEST", 2, 0, 134))]
    summary = {"dest": "/very/long/" + "x" * 80, "shards": 8, "cached_shards": 6, "tensors": 134,
               "reused_tensors": 135, "dropped_tensors": 1, "source_bytes": 10, "bytes_written": 20,
               "reused_bytes": 5, "seconds": 1.0, "shard_seconds": 0.5, "dtypes": {"BF16": 3}, "passes": passes,
               "timing": {"waited_s": 9.0, "flow_s": 1.0, "prefect_s": 6.5, "before_flow_s": 1.5}}
    out = io.StringIO()
    print_summary(summary, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "output:" and lines[1].strip() == summary["dest"]  # the label never wraps
    assert all(len(line) <= 80 for line in lines[2:]), [line for line in lines if len(line) > 80]
    assert "pass 1:   dequant → work: 6 shards (6 reused), 0 tensors written" in lines
    assert "plan 2:   4 dequantized, 2 cast" in lines
    assert "shards:   2 written, 6 reused from an earlier run" in lines
    assert "time:     9.0 s waited: 1.0 s converting, 6.5 s Prefect (server, runs)" in lines
    assert "          1.5 s start-up + planning, 0.50 s in shard tasks" in lines


def test_flow_reuses_the_clis_plan_unless_a_file_changed(ckpt):
    from ckptflow.flows.preflight import plan_conversion
    from ckptflow.flows.recipe import Recipe
    from ckptflow.storage.urls import open_location

    src, recipe = open_location(str(ckpt)), Recipe(dequant=True)
    planned = plan_conversion(src, recipe)
    assert plan_conversion(open_location(str(ckpt)), recipe, made=planned) is planned  # headers not read again
    assert plan_conversion(src, Recipe(dequant=True, fix_dtypes=True), made=planned) is not planned  # another recipe
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1000))
    again = plan_conversion(src, recipe, made=planned)
    assert again is not planned and again.ckpt.versions[shard.name] != planned.ckpt.versions[shard.name]

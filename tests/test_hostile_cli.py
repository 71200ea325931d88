"""A hostile tester's command lines (issue #27): undecodable paths, a stale server.json naming
someone else's process, a taken port, an unwritable PREFECT_HOME, no HOME, names that hold
control characters. Each ends in one `error:` line (or runs, and says so) within seconds, with
no traceback, and nothing that is not ckptflow's own is signalled."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptflow.flows.runtime.persistent_server import process_start
from ckptflow.flows.printable import printable

from .helpers import PYTHON, ROOT, cli_env

FAST_S = 5.0  # the issue asks for 2 s; a loaded 2-core machine gets margin (measured: 0.2-1.5 s)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env(temporary_server=True, **{"CKPTFLOW_SERVER_HOME": str(tmp_path / "srv"), **extra})


def _cli(args: list, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI in a subprocess, as a user runs it (`console_main`); its result and wall seconds."""
    began = time.monotonic()
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, errors="backslashreplace", timeout=timeout)
    return run, time.monotonic() - began


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("argv, label", [
    (["convert", b"SRC", "OUT", "--dequant"], "SOURCE"),
    (["convert", "SRC", b"OUT", "--dequant"], "DEST"),
    (["convert", "SRC", "OUT", "--dequant", "--work", b"W"], "--work"),
    (["watch", b"SRC", "OUT", "--dequant"], "SOURCE_PREFIX"),
    (["inspect", b"SRC"], "SOURCE"),
    (["demo", b"OUT"], "DEST"),
])
def test_a_path_that_is_not_utf8_is_one_error_line_before_prefect(tmp_path, argv, label):
    base = os.fsencode(tmp_path)
    args = [base + b"/" + a + b"\xff" if isinstance(a, bytes) else
            str(tmp_path / a) if a.isupper() else a for a in argv]
    run, seconds = _cli(args, _env(tmp_path))
    assert run.returncode == 2
    line = _one_error_line(run)
    bad = next(a for a in argv if isinstance(a, bytes)).decode()
    assert line == f"error: {label} path is not valid UTF-8: '{tmp_path}/{bad}\\xff'; rename it"
    assert seconds < FAST_S, seconds
    assert sorted(os.listdir(tmp_path)) == []  # nothing written: no DEST, no work folder, no demo


def _harmless_lookalike() -> subprocess.Popen:
    """A process whose command line mentions "prefect server", as a recycled PID's might."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "prefect", "server"],
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while b"prefect" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.02)  # until the exec: the record must name the process as it will stay
    return proc


def _write_record(tmp_path: Path, pid: int, started: str | None) -> Path:
    record = tmp_path / "srv" / "server.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": pid, "started": started,
                                  "prefect_home": str(tmp_path / "srv" / "prefect")}))
    return record


@pytest.mark.parametrize("started", ["proc:1", None], ids=["other-start-time", "no-start-time"])
def test_server_stop_never_signals_a_pid_it_cannot_prove_is_its_server(tmp_path, started):
    lookalike = _harmless_lookalike()
    try:
        record = _write_record(tmp_path, lookalike.pid, started)
        run, seconds = _cli(["server", "stop"], _env(tmp_path))
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"note: removed the stale {record}: " in run.stdout and "signalled nothing" in run.stdout
        assert "no local Prefect server was running" in run.stdout
        assert "Traceback" not in run.stderr
        time.sleep(0.3)  # a SIGTERM, had one been sent, has landed by now
        assert lookalike.poll() is None  # still alive
        assert not record.exists()
        assert seconds < FAST_S, seconds
    finally:
        lookalike.kill()
        lookalike.wait()


def test_server_stop_signals_the_pid_whose_start_time_it_recorded(tmp_path):
    """The other side of the proof: a record that matches is acted on (else the test above proves nothing)."""
    lookalike = _harmless_lookalike()
    try:
        record = _write_record(tmp_path, lookalike.pid, process_start(lookalike.pid))
        run, _ = _cli(["server", "stop"], _env(tmp_path))
        assert run.returncode == 0 and "local Prefect server stopped" in run.stdout, run.stdout + run.stderr
        assert lookalike.wait(10) == -15  # SIGTERM
        assert not record.exists()
    finally:
        if lookalike.poll() is None:
            lookalike.kill()
            lookalike.wait()


def test_server_start_on_a_taken_port_says_so_at_once(tmp_path):
    lookalike = _harmless_lookalike()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            record = _write_record(tmp_path, lookalike.pid, "proc:1")  # a stale record too: start removes it
            run, seconds = _cli(["server", "start", "--port", str(port)], _env(tmp_path))
            assert lookalike.poll() is None and not record.exists()
        finally:
            lookalike.kill()
            lookalike.wait()
    assert run.returncode == 2
    assert "note: removed the stale" in run.stdout
    assert _one_error_line(run) == (f"error: port {port} on 127.0.0.1 is taken by another program; choose "
                                    "another --port, or leave --port out to get a free one")
    assert seconds < FAST_S, seconds
    assert not (tmp_path / "srv" / "server.log").exists()  # nothing was spawned


def test_server_start_with_an_unwritable_home_names_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    env = _env(tmp_path, CKPTFLOW_SERVER_HOME=str(tmp_path / "a-file" / "srv"))
    run, seconds = _cli(["server", "start"], env)
    assert run.returncode == 2
    assert _one_error_line(run) == (f"error: the local server's folder {tmp_path}/a-file/srv/prefect is not "
                                    "writable (Not a directory); set CKPTFLOW_SERVER_HOME to a writable folder")
    assert seconds < FAST_S, seconds


def test_server_start_without_home_says_what_to_set(tmp_path):
    env = _env(tmp_path, HOME=str(tmp_path / "missing"))
    for var in ("CKPTFLOW_SERVER_HOME", "XDG_CACHE_HOME"):
        env.pop(var, None)
    run, seconds = _cli(["server", "start"], env)
    assert run.returncode == 2
    line = _one_error_line(run)
    assert line.startswith(f"error: HOME ({tmp_path}/missing) does not exist, so the local server has no folder")
    assert "CKPTFLOW_SERVER_HOME" in line
    assert seconds < FAST_S, seconds
    assert not (tmp_path / "missing").exists()


def test_convert_with_an_unwritable_prefect_home_names_it_before_starting_a_server(demo_ckpt, tmp_path):
    (tmp_path / "a-file").write_text("")
    env = _env(tmp_path, PREFECT_HOME=str(tmp_path / "a-file" / "prefect"))
    run, seconds = _cli(["convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant", "--work",
                         str(tmp_path / "w")], env)
    assert run.returncode == 2
    assert _one_error_line(run).startswith(f"error: PREFECT_HOME ({tmp_path}/a-file/prefect) is not writable "
                                           "(Not a directory); Prefect's temporary server keeps its database there")
    assert seconds < FAST_S, seconds
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_convert_without_home_runs_on_a_temporary_prefect_home_and_says_so(demo_ckpt, tmp_path):
    """No HOME, no PREFECT_HOME, no --work: the run completes; Prefect's fresh home (under TMPDIR)
    is gone after it; the default work location is a per-user folder of TMPDIR, so a rerun resumes."""
    (tmp_path / "tmp").mkdir()
    env = _env(tmp_path, HOME=str(tmp_path / "missing"), TMPDIR=str(tmp_path / "tmp"))
    for var in ("PREFECT_HOME", "XDG_CACHE_HOME", "CKPTFLOW_WORK"):
        env.pop(var, None)
    run, seconds = _cli(["convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant"], env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Failed to create the Prefect home" not in run.stderr
    notes = [ln for ln in run.stdout.splitlines() if "Prefect kept this run's records" in ln]
    assert notes == [f"note:     HOME ({tmp_path}/missing) does not exist: Prefect kept this run's records in a "
                     "temporary folder, removed at exit (set HOME or PREFECT_HOME to keep them)"]
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir())
    assert left == [f"ckptflow-{os.getuid()}"]  # the work folder; the temporary Prefect home was removed
    assert list((tmp_path / "tmp" / left[0] / "cache" / "ckptflow" / "work").iterdir())
    assert not (tmp_path / "missing").exists()
    print(f"convert without HOME: {seconds:.1f} s")


def test_printable_escapes_control_characters_and_undecodable_bytes():
    assert printable("model.layers.0.mlp") == "model.layers.0.mlp"
    assert printable("模型 é") == "模型 é"
    assert printable("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert printable("x\x1b[31m\x7f\x85") == "x\\x1b[31m\\x7f\\x85"
    assert printable("src\udcff") == "src\\xff"  # a non-UTF-8 file name byte, as Python decodes it
    assert printable("\u202eevil\u2028") == "\\u202eevil\\u2028"


def test_watch_table_shows_checkpoint_names_with_control_characters_on_one_line(demo_ckpt, tmp_path):
    names = ["evil\nname\x1b[31m", "tab\there"]
    for name in names:
        shutil.copytree(demo_ckpt, tmp_path / "in" / name)
    os.makedirs(os.fsencode(tmp_path / "in") + b"/bad\xffname")  # not UTF-8: printing it raised before
    for f in demo_ckpt.iterdir():
        shutil.copy(f, os.fsencode(tmp_path / "in") + b"/bad\xffname/" + os.fsencode(f.name))
    run, seconds = _cli(["watch", str(tmp_path / "in"), str(tmp_path / "out"), "--dequant", "--dry-run",
                         "--settle-seconds", "0"], _env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b" not in run.stdout and "Traceback" not in run.stderr
    rows = run.stdout.splitlines()
    assert [r.split()[0] for r in rows] == ["bad\\xffname", "evil\\nname\\x1b[31m", "tab\\there"]
    assert all(r.split()[1:3] == ["convert", "new"] for r in rows)
    assert seconds < FAST_S, seconds


def test_dry_run_lists_a_file_name_with_control_characters_on_one_line(demo_ckpt, tmp_path):
    index_path = demo_ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    old = sorted(set(index["weight_map"].values()))[0]
    new = "model\n\x1b[2Jshard.safetensors"
    (demo_ckpt / old).rename(demo_ckpt / new)
    index["weight_map"] = {t: new if f == old else f for t, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    run, seconds = _cli(["convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant", "--dry-run",
                         "--work", str(tmp_path / "w")], _env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b" not in run.stdout and "Traceback" not in run.stderr
    files = [ln for ln in run.stdout.splitlines() if ln.strip().startswith("files: ")]
    assert len(files) == 1 and "model\\n\\x1b[2Jshard.safetensors" in files[0]
    assert seconds < FAST_S, seconds

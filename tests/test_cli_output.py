"""What the CLI prints (issue 29): with --json stdout is one JSON document (`| jq` works); `time:`
counts from the CLI's own start, not from a shell that exec'd it; progress bars know their totals
from the first frame, promise no absurd ETA, and leave the summary at column 0."""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import termios
import time

import pytest

from ckptflow.flows.cli.bars import Bar, open_bars
from ckptflow.tasks.run import progress

from .helpers import PYTHON, ROOT, cli_env, run_main

CLI = [PYTHON, "-m", "ckptflow.flows.cli"]
# Seconds a shell spends before it starts the CLI (`bash -c "sleep 3 && ckptflow …"`, as issue #29
# names it); `time:` must not count them. The bound below is taken when the `time:` line reaches the
# test, not at the process's exit (Prefect's exit teardown follows the summary).
SLEEP = 3
# Reports that start no flow are what the CLI prints, tested in this process (helpers.run_main);
# `time:` and the terminal's bars are about the process, tested on real ones below.
ckptflow = run_main


def screen(raw: str, cols: int | None = None) -> list[str]:
    """The rows a terminal shows after `raw`: enough of a VT100 for tqdm (CR, LF, cursor up/down,
    autowrap at `cols`). LF also returns to column 0, as a tty's ONLCR makes it."""
    rows: list[list[str]] = [[]]
    r = c = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[([0-9;]*)([A-Za-z])", raw[i:])
            if m:
                n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
                r = max(0, r - n) if m.group(2) == "A" else r + n if m.group(2) == "B" else r
                i += m.end()
                continue
            i += 2
            continue
        if ch == "\r":
            c = 0
        elif ch == "\n":
            r, c = r + 1, 0
        else:
            if cols is not None and c >= cols:  # autowrap: the character goes to the next row
                r, c = r + 1, 0
            while len(rows) <= r:
                rows.append([])
            row = rows[r]
            row.extend(" " * (c + 1 - len(row)))
            row[c] = ch
            c += 1
        while len(rows) <= r:
            rows.append([])
        i += 1
    return ["".join(row).rstrip() for row in rows]


def run_in_pty(argv: list[str], cols: int = 100, timeout: float = 300,
               mark: bytes = b"time:") -> tuple[int, str, float]:
    """(exit status, everything the terminal received, seconds until `mark` had reached the
    terminal) of `argv` on a pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    env = cli_env()  # without xdist, the first call starts the session's server: not in the clock
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    marked = float("inf")
    try:
        while time.monotonic() - t0 < timeout:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if marked == float("inf") and mark in out:
                    marked = time.monotonic() - t0
            elif proc.poll() is not None:
                break
        code = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, out.decode(errors="replace"), marked


def waited_bound(wall: float) -> float:
    """The most the CLI itself can have run: the caller's wall clock when `time:` arrived, less the
    shell's sleep (+ the summary's rounding)."""
    return wall - SLEEP + 0.06


# -- --json: one document on stdout --------------------------------------------------------------

def test_json_reports_are_all_of_stdout(demo_ckpt, tmp_path):
    dry = ckptflow("convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.load(io.StringIO(dry.stdout))  # the whole of stdout, not its last line
    assert report["dry_run"] is True and report["output_shards"] == 6 and report["source_tensors"] == 239
    assert dry.stderr.startswith("dry run: dequant of ")  # the text a person reads, on stderr

    shutil.copytree(demo_ckpt, tmp_path / "in" / "fp8")
    watch = ckptflow("watch", str(tmp_path / "in"), str(tmp_path / "outs"), "--dequant", "--dry-run",
                     "--settle-seconds", "0", "--json")
    assert watch.returncode == 0, watch.stderr
    report = json.load(io.StringIO(watch.stdout))
    assert [(c["name"], c["action"]) for c in report["checkpoints"]] == [("fp8", "convert")]
    assert watch.stderr.split()[:3] == ["fp8", "convert", "new"]

    inspect = ckptflow("inspect", str(demo_ckpt), "--json")
    assert inspect.returncode == 0, inspect.stderr
    report = json.load(io.StringIO(inspect.stdout))
    assert report["files"] == 6 and report["scheme"]["method"] == "fp8"

    verify = ckptflow("verify", str(demo_ckpt), "--json")
    assert verify.returncode == 0, verify.stderr
    report = json.load(io.StringIO(verify.stdout))
    assert report["ok"] is True and report["torch_dtype"] == "BF16" and report["problems"] == []
    assert {r["dtype"] for r in report["dtypes"]} >= {"BF16", "F8_E4M3"}
    assert "all floating tensors match the config" in verify.stderr

    config = json.loads((demo_ckpt / "config.json").read_text())
    config["torch_dtype"] = "float16"  # every BF16 tensor now mismatches: exit 1, still one document
    (demo_ckpt / "config.json").write_text(json.dumps(config))
    bad = ckptflow("verify", str(demo_ckpt), "--json")
    assert bad.returncode == 1
    report = json.load(io.StringIO(bad.stdout))
    assert report["ok"] is False and report["mismatches"][0]["expected"] == "F16"

    validate = ckptflow("validate", str(demo_ckpt), "--json")
    assert validate.returncode == 0, validate.stderr
    report = json.load(io.StringIO(validate.stdout))
    assert report["ok"] is True and report["tensors"] == 239 and report["layout"] == "index consistent"


@pytest.mark.slow
def test_convert_json_is_all_of_stdout_and_time_excludes_what_ran_before_exec(demo_ckpt, tmp_path):
    cli = shlex.join([*CLI, "convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant",
                      "--work", str(tmp_path / "w"), "--json"])
    env = cli_env()  # without xdist, the first call starts the session's server: not in the clock
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", f"sleep {SLEEP} && exec {cli}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall, err = float("inf"), []
    for line in proc.stderr:  # --json: the summary's text comes on stderr, the JSON at the exit
        err.append(line)
        if line.startswith("time:"):
            wall = time.monotonic() - t0  # when the CLI said it; its exit teardown comes after
    run = subprocess.CompletedProcess(proc.args, proc.wait(300), proc.stdout.read(), "".join(err))
    proc.stdout.close()
    proc.stderr.close()
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.load(io.StringIO(run.stdout))
    assert summary["shards"] == 6 and "records" not in summary
    assert "\noutput:" in "\n" + run.stderr and "time:" in run.stderr  # the text went to stderr
    t = summary["timing"]
    # exec keeps bash's process: /proc's start time counted the sleep (the README's 221 s "waited")
    assert t["flow_s"] < t["waited_s"] <= waited_bound(wall), (t, wall)


# -- terminal output: bars, then a summary at column 0 -------------------------------------------

BAR = re.compile(r"(bytes |shards): *(\d+)%\|[^|]*\| *(\S+?)/(\S+) \[([0-9:]+)<([0-9:?]+),")
ANY_BAR = re.compile(r"(bytes |shards): .*\[[0-9:]+[<,]")  # any tqdm frame of ours, total or not


def seconds(clock: str) -> int:
    n = 0
    for part in clock.split(":"):
        n = n * 60 + int(part)
    return n


@pytest.mark.slow
def test_bars_have_totals_sane_etas_and_the_summary_starts_at_column_0(demo_ckpt, tmp_path):
    cli = shlex.join([*CLI, "convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant",
                      "--work", str(tmp_path / "w")])
    cols = 100
    code, raw, wall = run_in_pty(["bash", "-c", f"sleep {SLEEP} && {cli}"], cols)  # no exec this time
    assert code == 0, raw[-3000:]
    frames = [f for f in re.split(r"[\r\n]|\x1b\[A", raw) if ANY_BAR.match(f)]
    assert {f[:6] for f in frames} == {"bytes ", "shards"}, raw[:2000]
    for frame in frames:  # from the first frame on: "n/total", never a bare counter
        m = BAR.match(frame)
        assert m, f"bar frame without a total: {frame!r}"
        if m.group(6) != "?":  # a run of seconds: an ETA of an hour is absurd
            assert seconds(m.group(6)) < 3600, frame
    first = {f[:6]: BAR.match(f) for f in reversed(frames)}  # each bar's first frame
    assert first["shards"].group(3, 4) == ("0", "6") and first["bytes "].group(3) == "0.00"

    rows = screen(raw, cols)
    starts = [r for r in rows if "output:" in r]
    assert starts and starts[0].startswith("output:"), rows[-12:]  # not "…   o" then "utput:" below
    assert not any(ANY_BAR.search(r) for r in rows), rows  # bars cleared, not left above the summary
    said = re.search(r"^time: +([0-9.]+) s waited", "\n".join(rows), re.M)
    assert said and float(said.group(1)) <= waited_bound(wall) + 0.05, (said, wall)


def test_closing_the_bars_leaves_the_cursor_at_column_0(capsys):
    bars = open_bars(5_000_000, 6, disable=False)
    sink = progress.ProgressSink(*bars)
    try:
        sink.add_bytes(2_000_000)
        sink.shard_done()
        bars[0].refresh(), bars[1].refresh()
    finally:
        sink.close()
    print("output:   DEST", file=__import__("sys").stderr)
    rows = screen(capsys.readouterr().err)
    assert [r for r in rows if r] == ["output:   DEST"], rows


def test_no_eta_until_a_share_of_the_total_has_moved():
    """A first small tensor 1.5 s into a 688 GB run made plain tqdm promise ~19996 hours."""
    def frames(cls: type) -> list[str]:
        out, now = io.StringIO(), [0.0]
        bar = cls(total=688_000_000_000, unit="B", unit_scale=True, file=out, disable=False, mininterval=0,
                  ncols=100, leave=False)
        bar._time = lambda: now[0]
        bar.reset(total=688_000_000_000)
        for t, n in ((1.5, 14_336), (3.0, 8 << 20), (12.0, 8_000_000_000)):
            now[0] = t
            bar.update(n)
        bar.close()
        # {bytes done: the ETA its frame promised}
        return dict(re.findall(r"(\S+)/688G \[[0-9:]+<([0-9:?]+),", out.getvalue()))

    plain = frames(__import__("tqdm").tqdm)
    assert seconds(plain["14.3k"]) > 1000 * 3600  # what users saw
    ours = frames(Bar)
    assert ours["0.00"] == ours["14.3k"] == ours["8.40M"] == "?"  # of 688 GB: no rate worth a promise yet
    assert ours["8.01G"] != "?" and seconds(ours["8.01G"]) < 24 * 3600  # 8 GB in 12 s: an ETA, a sane one

"""Never lose or fake data: overlapping paths, tampered or changed files, one run per DEST, full or
read-only disks, damaged journals, orphaned children. Through the real CLI where a user meets it."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import PYTHON, ROOT, cli_env, engine_convert, one_error_line, run_main
from .helpers import tree


def digest_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, hidden ones included: what 'unchanged' means."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def ckptflow(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI's `main(argv)` in this process (its refusals and output; the runs it competes with or
    that are killed are real processes below); a flow it runs needs the `prefect_harness` fixture."""
    return run_main(*args, **env)




# --- SOURCE is read-only, however DEST is spelled --------------------------------------------

def _spellings(src: Path) -> dict[str, tuple[list[str], str]]:
    """Command lines that name SOURCE again as DEST, a parent or a child of it, or the work dir."""
    parent = src.parent
    (parent / "link").symlink_to(src)
    return {
        "dotdot": (["convert", str(src), f"{parent}/../{parent.name}/{src.name}", "--dequant"], "same place"),
        "dot-slash": (["convert", str(src), f"{parent}/./{src.name}/", "--dequant"], "same place"),
        "symlink": (["convert", str(src), str(parent / "link"), "--dequant"], "same place"),
        "inside-via-link": (["convert", str(src), str(parent / "link" / "out"), "--dequant"], "lies inside"),
        "prune-parent": (["convert", str(src), str(parent), "--dequant", "--prune"], "lies inside"),
        "work-in-source": (["convert", str(src), str(parent / "out"), "--dequant", "--work", str(src / "w")],
                           "lies inside"),
        "megatron": (["megatron", str(src), str(src / "hf")], "lies inside"),
        "watch": (["watch", str(parent), f"{parent}/./", "--dequant"], "same place"),
    }


@pytest.mark.slow
def test_overlapping_paths_are_refused_before_anything_is_touched(demo_ckpt, tmp_path):
    before = digest_tree(tmp_path)
    for case, (args, how) in _spellings(demo_ckpt).items():
        t0 = time.monotonic()
        run = ckptflow(*args)
        line = one_error_line(run, how, str(demo_ckpt.parent).rstrip("/"))
        assert "nothing was written" in line, (case, line)
        assert time.monotonic() - t0 < 30, case  # refused before Prefect starts
        assert digest_tree(tmp_path) == before, case  # not a byte changed, nothing created


def test_prune_never_deletes_under_source(demo_ckpt, tmp_path):
    from ckptflow.tasks.run.passes import prepare_dest
    from ckptflow.storage.urls import StorageError, open_location

    before = digest_tree(demo_ckpt)
    with pytest.raises(StorageError, match="refusing to delete .* inside SOURCE"):
        # The overlap check runs first in every flow; this is the guard behind it.
        prepare_dest(open_location(str(demo_ckpt)), set(), prune=True, protected=(open_location(str(demo_ckpt)),))
    assert digest_tree(demo_ckpt) == before


# --- a reused file proves it is the one that was committed ------------------------------------

def test_tampered_dest_shard_is_rewritten(demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    first = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    clean = tree(out)
    victim = out / "model-00004-of-00006.safetensors"
    st = victim.stat()
    with open(victim, "r+b") as f:  # 64 bytes flipped inside the data, size and mtime kept
        f.seek(st.st_size // 2)
        chunk = f.read(64)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert [r["name"] for r in again["records"] if not r["cached"]] == [victim.name]
    assert again["cached_shards"] == first["shards"] - 1
    assert tree(out) == clean


def test_source_changed_in_place_same_size_and_mtime_is_seen(demo_ckpt, tmp_path):
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    out, work = tmp_path / "out", tmp_path / "work"
    engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    # Another checkpoint of the same layout, other values: copy one shard's bytes over in place.
    other = tmp_path / "other"
    make_deepseek_v3_fp8(open_location(str(other)), seed=1)
    name = "model-00003-of-00006.safetensors"
    victim, new = demo_ckpt / name, (other / name).read_bytes()
    st = victim.stat()
    assert len(new) == st.st_size and new != victim.read_bytes()
    with open(victim, "r+b") as f:
        f.write(new)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert name in [r["name"] for r in again["records"] if not r["cached"]]
    fresh = tmp_path / "fresh"
    engine_convert(str(demo_ckpt), str(fresh), work=str(tmp_path / "work-fresh"), dequant=True)
    assert tree(out) == tree(fresh)


def test_empty_or_damaged_journal_entries_count_as_absent(demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    clean = tree(out)
    entries = sorted((work / "journal").glob("*.json"))
    assert len(entries) == 6
    entries[0].write_bytes(b"")            # what a power cut leaves
    entries[1].write_bytes(b"{\"size\": ")  # cut mid-write
    entries[2].write_text("[1, 2]")         # valid JSON, wrong shape
    again = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert again["cached_shards"] == 3
    assert tree(out) == clean


def test_shard_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    from ckptflow.storage import writer
    from ckptflow.storage.safetensors_format import TensorSpec
    from ckptflow.storage.urls import open_location

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(writer.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    w = writer.SafetensorsWriter(open_location(str(tmp_path)), "a.safetensors", [TensorSpec("x", "U8", (4,))])
    w.write("x", b"\x01\x02\x03\x04")
    record = w.commit()
    assert events == ["fsync", "rename", "fsync"]  # file bytes, publish, then the directory entry
    assert record.identity and record.identity.startswith(f"{record.size}:")


# --- one DEST, one run ------------------------------------------------------------------------

# The real CLI (console_main(), what the console script calls), holding after its first shard until the
# file named by CKPTFLOW_TEST_GO exists (or 120 s pass), so a test can act while it runs.
SLOW_CLI = """
import os, sys, time
import ckptflow.tasks.run.shard as st
real, done = st.write_shard, []
def slow(*a, **k):
    go = os.environ["CKPTFLOW_TEST_GO"]
    deadline = time.monotonic() + 120
    while done and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.1)
    done.append(1)
    return real(*a, **k)
st.write_shard = slow
from ckptflow.flows.cli import console_main
sys.exit(console_main())
"""


@pytest.mark.slow
def test_two_runs_into_one_dest_one_refuses_and_output_is_exact(prefect_harness, demo_ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(demo_ckpt), str(out), "--dequant"]
    go = tmp_path / "go"
    first = subprocess.Popen([PYTHON, "-c", SLOW_CLI, *args, "--work", str(tmp_path / "w1")], cwd=ROOT,
                             env=cli_env(CKPTFLOW_TEST_GO=str(go)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.safetensors")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = ckptflow(*args, "--work", str(tmp_path / "w2"))
        one_error_line(second, f"DEST {out} is being written by another ckptflow run", f"pid {first.pid}")
        assert first.poll() is None  # the refusal came while the first run held DEST
        go.touch()
        assert first.wait(300) == 0, first.communicate()[1][-3000:]
    finally:
        first.kill()
    clean = tmp_path / "clean"
    engine_convert(demo_ckpt, clean, tmp_path / "w3", dequant=True)  # the reference: no flow run needed
    assert tree(out) == tree(clean)


# The real CLI, SIGKILLed by itself in the instant after its second shard's rename: the file is
# published, the journal's final entry not yet written.
KILLED_AFTER_RENAME_CLI = """
import os, signal, sys
import ckptflow.storage.writer as w
real, renames = w.fsync_dir, []
def fsync_dir(path):
    real(path)
    if path == os.environ["CKPTFLOW_TEST_OUT"]:  # a shard's rename, not a journal entry's
        renames.append(path)
    if len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
w.fsync_dir = fsync_dir
from ckptflow.flows.cli import console_main
sys.exit(console_main())
"""


@pytest.mark.slow
def test_kill_right_after_a_rename_redoes_no_shard(prefect_harness, demo_ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(demo_ckpt), str(out), "--dequant", "--work", str(tmp_path / "w")]
    killed = subprocess.run([PYTHON, "-c", KILLED_AFTER_RENAME_CLI, *args], cwd=ROOT,
                            env=cli_env(CKPTFLOW_TEST_OUT=str(out)),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    published = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(published) == 2
    mtimes = {n: (out / n).stat().st_mtime_ns for n in published}
    rerun = ckptflow(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["cached_shards"] == 2  # the one published before its final journal entry too
    assert {n: (out / n).stat().st_mtime_ns for n in published} == mtimes
    clean = tmp_path / "clean"
    engine_convert(demo_ckpt, clean, tmp_path / "w2", dequant=True)  # the reference: no flow run needed
    assert tree(out) == tree(clean)


# --- full and read-only disks -----------------------------------------------------------------

def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_is_one_line_naming_the_file_and_leaves_nothing_complete(prefect_harness, demo_ckpt, small_disk,
                                                                           tmp_path):
    before = digest_tree(demo_ckpt)
    out = small_disk / "out"  # the BF16 output is ~5 MB; the disk holds 2 MB
    run = ckptflow("convert", str(demo_ckpt), str(out), "--dequant", "--work", str(tmp_path / "w"))
    line = one_error_line(run, "no space left on device", ".safetensors", "more bytes were needed")
    assert "run the same command again to resume" in line
    assert digest_tree(demo_ckpt) == before
    assert not (out / "model.safetensors.index.json").exists() and not (out / "config.json").exists()
    assert not [p for p in out.iterdir() if ".partial-" in p.name]  # the cut temp file is gone
    from ckptflow.storage.urls import open_location
    from ckptflow.storage.reader import read_header

    for shard in out.glob("*.safetensors"):  # what was published is whole
        h = read_header(open_location(str(out)), shard.name)
        assert max(t.end for t in h.tensors.values()) == shard.stat().st_size


@pytest.mark.slow
def test_read_only_or_file_dest_is_one_line(prefect_harness, demo_ckpt, tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "size=1m,ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = ckptflow("convert", str(demo_ckpt), str(ro / "out"), "--dequant", "--work", str(tmp_path / "w"))
        one_error_line(run, str(ro), "read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    run = ckptflow("convert", str(demo_ckpt), str(afile), "--dequant", "--work", str(tmp_path / "w"))
    one_error_line(run, str(afile), "is a file")
    assert afile.read_text() == "not a folder"


def test_symlinked_directory_in_source_is_followed_once(tmp_path):
    from ckptflow.storage.files import list_files
    from ckptflow.storage.urls import open_location

    src = tmp_path / "src"
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sub" / "vocab.txt").write_text("a b")
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "linked").symlink_to(tmp_path / "elsewhere")
    (src / "loop").symlink_to(src)          # a loop is walked once
    (src / "broken").symlink_to(tmp_path / "nowhere")
    assert list_files(open_location(str(src))) == {"config.json": 2, "linked/sub/vocab.txt": 3}


# --- no orphans -------------------------------------------------------------------------------

def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_cli_sigkilled_alone_leaves_no_child_behind(demo_ckpt, tmp_path):
    import psutil

    out = tmp_path / "out"
    cli = subprocess.Popen([PYTHON, "-c", SLOW_CLI, "convert", str(demo_ckpt), str(out), "--dequant",
                            "--work", str(tmp_path / "w")], cwd=ROOT,
                           env=cli_env(CKPTFLOW_TEST_GO=str(tmp_path / "never")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.safetensors")) and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        children = _descendants(cli.pid)
        assert cli.poll() is None and any("python" in c.name() for c in children), "no server child seen"
        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as the OOM killer does
        cli.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                                  for c in children):
            time.sleep(0.2)
        survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not survivors, [(c.pid, c.cmdline()) for c in survivors]
    finally:
        try:
            os.killpg(cli.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the same rules on object storage -----------------------------------------------------------

def test_object_store_lock_refuses_a_live_holder_and_takes_over_a_dead_one(s3_options, monkeypatch):
    from ckptflow.storage import lock
    from ckptflow.storage.urls import open_location

    dst = open_location(f"s3://{s3_options['bucket']}/out", s3_options["options"])
    with lock.dest_lock(dst):
        held = json_of(dst, lock.LOCK_NAME)
        assert held["pid"] == os.getpid()
        with pytest.raises(lock.DestBusy, match=rf"s3://{s3_options['bucket']}/out is being written by another"):
            with lock.dest_lock(dst):
                pass
    assert not dst.fs.exists(dst.path(lock.LOCK_NAME))  # released on exit
    with dst.fs.open(dst.path(lock.LOCK_NAME), "wb") as f:  # a run that died 10 minutes ago
        f.write(json.dumps({"pid": 1, "host": "gone", "token": "x", "heartbeat": time.time() - 600}).encode())
    with lock.dest_lock(dst):
        assert json_of(dst, lock.LOCK_NAME)["pid"] == os.getpid()


def json_of(loc, name):
    with loc.fs.open(loc.path(name), "rb") as f:
        return json.loads(f.read())


def test_tampered_shard_on_s3_is_rewritten(s3_options, demo_ckpt, tmp_path):
    import s3fs

    opts, bucket = s3_options["options"], s3_options["bucket"]
    dest, work = f"s3://{bucket}/out", str(tmp_path / "work")
    engine_convert(str(demo_ckpt), dest, work=work, storage_options=opts, dequant=True)
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    name = f"{bucket}/out/model-00002-of-00006.safetensors"
    good = fs.cat_file(name)
    bad = bytearray(good)
    bad[len(bad) // 2: len(bad) // 2 + 64] = bytes(64)  # same size, other bytes, a new ETag
    fs.pipe_file(name, bytes(bad))
    again = engine_convert(str(demo_ckpt), dest, work=work, storage_options=opts, dequant=True)
    assert [r["name"] for r in again["records"] if not r["cached"]] == ["model-00002-of-00006.safetensors"]
    assert fs.cat_file(name) == good


def test_a_shard_key_that_cannot_be_hashed_raises_instead_of_naming_every_entry_none():
    import threading

    from ckptflow.tasks.run.resume import shard_key

    assert shard_key("s", None, [], "d", {"a": 1}) == shard_key("s", None, [], "d", {"a": 1})
    with pytest.raises(Exception, match="Unable to create hash"):
        shard_key("s", None, [], "d", {"a": threading.Lock()})  # was None: journal entry 'None.json'

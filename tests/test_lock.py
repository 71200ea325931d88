"""DEST's lock: never written through a link, and on object stores owned by compare-and-swap only.

Local cases open the real lock path; object-store cases run s3fs against moto's S3 server with
the lease shortened by CKPTFLOW_LOCK_STALE_S / CKPTFLOW_LOCK_HEARTBEAT_S."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ckptflow.storage import lock, object_lock
from ckptflow.storage.urls import StorageError, open_location

from .helpers import PYTHON, ROOT, cli_env, one_error_line, run_main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- local: the lock file is DEST's own plain file, or the run is refused -----------------------

def _plant(kind: str, at: Path, outside: Path) -> None:
    if kind == "symlink":
        at.symlink_to(outside / "victim.bin")
    elif kind == "dangling":
        at.symlink_to(outside / "not-there")
    elif kind == "hardlink":
        os.link(outside / "victim.bin", at)
    elif kind == "fifo":
        os.mkfifo(at)
    elif kind == "dir":
        at.mkdir()


@pytest.mark.parametrize("kind,what", [("symlink", "a symbolic link to"), ("dangling", "a symbolic link to"),
                                       ("hardlink", "a file with 2 hard links"), ("fifo", "a FIFO"),
                                       ("dir", "a directory")])
def test_local_lock_refuses_anything_but_its_own_plain_file(tmp_path, kind, what):
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    dest.mkdir()
    (outside / "victim.bin").write_bytes(b"source shard bytes" * 100)
    before = sha(outside / "victim.bin")
    _plant(kind, dest / lock.LOCK_NAME, outside)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        with lock.dest_lock(open_location(str(dest))):
            pytest.fail("the lock was taken")
    assert time.monotonic() - t0 < 2  # a FIFO does not hang the open
    msg = str(err.value)
    assert f"{dest / lock.LOCK_NAME} is {what}" in msg and "Remove it" in msg, msg
    assert sha(outside / "victim.bin") == before
    assert sorted(p.name for p in outside.iterdir()) == ["victim.bin"]  # the dangling target was not made
    assert [p.name for p in dest.iterdir()] == [lock.LOCK_NAME]  # what was planted, nothing else


def test_local_lock_still_takes_a_file_left_by_a_killed_run(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / lock.LOCK_NAME).write_text('{"pid": 1}')  # SIGKILLed holder: the file stays, the flock went
    with lock.dest_lock(open_location(str(dest))):
        assert json.loads((dest / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (dest / lock.LOCK_NAME).exists()


# --- object stores -----------------------------------------------------------------------------

@pytest.fixture
def s3_dest(s3_options, monkeypatch):
    monkeypatch.setenv("CKPTFLOW_LOCK_STALE_S", "1")
    monkeypatch.setenv("CKPTFLOW_LOCK_HEARTBEAT_S", "0.2")
    return open_location(f"s3://{s3_options['bucket']}/out", s3_options["options"])


def put_lock(dst, body: bytes) -> None:
    dst.fs.pipe_file(dst.path(lock.LOCK_NAME), body)


def lock_json(dst) -> dict:
    return json.loads(dst.fs.cat_file(dst.path(lock.LOCK_NAME)))


@pytest.mark.parametrize("stale,beat,ok", [("90", None, (90.0, 20.0)), ("3", None, (3.0, 3 / 4.5)),
                                           ("3", "0.5", (3.0, 0.5)), ("abc", None, "not a positive"),
                                           ("-1", None, "not a positive"), ("nan", None, "not a positive"),
                                           ("3", "3", "must be shorter")])
def test_lease_limits_come_from_the_environment(monkeypatch, stale, beat, ok):
    from ckptflow.storage.lock_common import limits

    monkeypatch.setenv("CKPTFLOW_LOCK_STALE_S", stale)
    if beat is None:
        monkeypatch.delenv("CKPTFLOW_LOCK_HEARTBEAT_S", raising=False)
    else:
        monkeypatch.setenv("CKPTFLOW_LOCK_HEARTBEAT_S", beat)
    if isinstance(ok, tuple):
        assert limits() == pytest.approx(ok)
    else:
        with pytest.raises(StorageError, match=ok):
            limits()


def test_refusal_says_when_the_lock_goes_stale(s3_options, monkeypatch):
    dst = open_location(f"s3://{s3_options['bucket']}/out", s3_options["options"])
    put_lock(dst, json.dumps({"pid": 4242, "host": "h", "since": "x", "token": "t",
                              "heartbeat": time.time() - 12.2}).encode())
    with pytest.raises(lock.DestBusy) as err:
        with lock.dest_lock(dst):
            pass
    assert "pid 4242 on h" in str(err.value)
    # The age is the lock's heartbeat against our clock (the request takes a moment or two).
    assert re.search(r"stale after 90 s without a heartbeat; last heartbeat 1[234] s ago", str(err.value))


def test_two_runs_that_both_judge_a_lock_stale_have_one_winner(s3_dest, monkeypatch):
    """Both read the dead run's version; the rival writes first; our If-Match write then fails and
    we judge the rival's fresh version instead: refused. (Run in turn, not in threads: moto's
    server does not serialize conditional writes the way S3 does.)"""
    from ckptflow.storage import conditional

    put_lock(s3_dest, json.dumps({"pid": 1, "token": "dead", "heartbeat": time.time() - 60}).encode())
    real_read, rival = conditional.read, []

    def read_then_rival(loc, name):
        got = real_read(loc, name)
        if not rival:
            rival.append(None)
            rival[0] = object_lock.acquire(s3_dest)  # between our read and our write
        return got

    monkeypatch.setattr(conditional, "read", read_then_rival)
    with pytest.raises(lock.DestBusy, match="last heartbeat 0 s ago"):
        object_lock.acquire(s3_dest)
    assert lock_json(s3_dest)["token"] == rival[0].holder["token"]
    rival[0].release()
    assert not s3_dest.fs.exists(s3_dest.path(lock.LOCK_NAME))
    mine = object_lock.acquire(s3_dest)  # free again: created, not taken over
    assert mine.renew() and lock_json(s3_dest)["token"] == mine.holder["token"]
    mine.release()


def test_a_paused_holder_loses_its_lock_and_publishes_nothing(s3_dest, s3_options):
    from ckptflow.storage.files import write_json

    first = object_lock.acquire(s3_dest)  # no heartbeat thread: as if the process were stopped
    time.sleep(1.3)  # past the stale limit
    second = object_lock.acquire(s3_dest)  # takes over the stale lock
    assert first.renew() is False  # its conditional heartbeat no longer matches
    object_lock._LEASES[id(first)] = first
    try:
        with pytest.raises(lock.LockLost, match=r"lost its lock after \d+ s without a heartbeat .* holds it now; "
                                                 "it stopped before writing s3://.*/out/config.json"):
            write_json(s3_dest, "config.json", {"a": 1})
    finally:
        object_lock._LEASES.pop(id(first))
    s3_dest.fs.invalidate_cache()
    assert not s3_dest.fs.exists(s3_dest.path("config.json"))
    bucket = s3_options["bucket"]
    assert s3_dest.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    first.release()  # must not delete the new holder's lock
    assert lock_json(s3_dest)["token"] == second.holder["token"]
    assert second.renew() is True
    second.release()


def test_a_run_woken_after_a_takeover_starts_no_file_and_a_fresh_lease_costs_no_request(s3_dest, s3_options,
                                                                                        monkeypatch):
    """A file under DEST is not started once the lease is lost: a paused run that wakes (its last
    confirmation long past) checks with the store before computing a shard, not at its publish.
    While the heartbeat keeps the lease fresh, starting a file asks the store nothing."""
    from ckptflow.storage import conditional
    from ckptflow.storage.writer import AtomicFile

    lease = object_lock.acquire(s3_dest)  # no heartbeat thread: its freshness is set by hand below
    lease.beat_s = 30.0  # "fresh" then holds however slowly a loaded machine runs this test
    object_lock._LEASES[id(lease)] = lease
    real_replace, writes = conditional.replace, []
    monkeypatch.setattr(conditional, "replace", lambda *a, **k: writes.append(a[1]) or real_replace(*a, **k))
    try:
        AtomicFile(s3_dest, "fresh.bin").abort()
        assert writes == []  # confirmed just now: no request
        lease.confirmed -= 10 * lease.beat_s  # unconfirmed for long: asked, still ours, so the file starts
        AtomicFile(s3_dest, "renewed.bin").abort()
        assert writes == [lock.LOCK_NAME]
        # Another run took it over while this one was paused.
        put_lock(s3_dest, json.dumps({"pid": 7, "host": "other", "token": "theirs",
                                      "heartbeat": time.time()}).encode())
        lease.confirmed -= 10 * lease.beat_s
        with pytest.raises(lock.LockLost, match=r"pid 7 on other holds it now; it stopped before writing "
                                                 r"s3://.*/out/model-00002\.safetensors"):
            AtomicFile(s3_dest, "model-00002.safetensors")
        assert lease.lost
        with pytest.raises(lock.LockLost):  # lost: every later start refuses at once
            AtomicFile(s3_dest, "model-00003.safetensors")
    finally:
        object_lock._LEASES.pop(id(lease))
    bucket = s3_options["bucket"]
    s3_dest.fs.invalidate_cache()
    assert sorted(s3_dest.fs.find(bucket)) == [s3_dest.path(lock.LOCK_NAME)]  # nothing else started
    assert s3_dest.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    assert lock_json(s3_dest)["token"] == "theirs"


def test_heartbeat_thread_notices_a_takeover(s3_dest):
    from ckptflow.storage.files import write_json

    with lock.dest_lock(s3_dest):
        write_json(s3_dest, "a.json", 1)  # held: publishes go through
        # Another run's version replaces ours (what a takeover after a pause leaves).
        put_lock(s3_dest, json.dumps({"pid": 7, "host": "other", "token": "theirs",
                                      "heartbeat": time.time()}).encode())
        (lease,) = object_lock._LEASES.values()
        deadline = time.monotonic() + 10  # a heartbeat comes every 0.2 s; a loaded machine may delay a few
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost and "pid 7 on other holds it now" in lease.lost
        with pytest.raises(lock.LockLost):
            write_json(s3_dest, "b.json", 2)
    assert lock_json(s3_dest)["token"] == "theirs"  # leaving did not delete the other run's lock
    s3_dest.fs.invalidate_cache()
    assert s3_dest.fs.exists(s3_dest.path("a.json")) and not s3_dest.fs.exists(s3_dest.path("b.json"))


@pytest.mark.parametrize("body", [b"\x00not json", b'{"pid": 3, "heartbeat": "soon"}', "future"])
def test_untrusted_lock_is_taken_over_after_the_stale_limit_of_watching(s3_dest, body):
    if body == "future":
        body = json.dumps({"pid": 3, "host": "h", "token": "t", "heartbeat": time.time() + 3600}).encode()
    put_lock(s3_dest, body)
    t0 = time.monotonic()
    with lock.dest_lock(s3_dest):
        waited = time.monotonic() - t0
        assert lock_json(s3_dest)["pid"] == os.getpid()
    assert 1.0 <= waited < 5, waited


def test_untrusted_lock_that_changes_while_watched_belongs_to_a_live_run(s3_dest):
    def future(n: int) -> bytes:
        return json.dumps({"pid": 3, "host": "skewed", "token": "t", "n": n,
                           "heartbeat": time.time() + 3600}).encode()

    put_lock(s3_dest, future(0))
    beat = threading.Timer(0.4, lambda: put_lock(s3_dest, future(1)))  # its holder's heartbeat
    beat.start()
    with pytest.raises(lock.DestBusy, match="pid 3 on skewed.*changed while this run watched it"):
        with lock.dest_lock(s3_dest):
            pass
    beat.join()
    assert lock_json(s3_dest)["n"] == 1


# --- through the real CLI ------------------------------------------------------------------------

def ckptflow(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_main(*args, **env)  # main(argv) in this process; the runs that compete below are processes




def digest_tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["source-shard", "dangling"])
def test_cli_refuses_a_lock_path_that_is_a_link(prefect_harness, demo_ckpt, tmp_path, target):
    dest = tmp_path / "out"
    dest.mkdir()
    shard = demo_ckpt / "model-00001-of-00006.safetensors"
    aim = shard if target == "source-shard" else tmp_path / "elsewhere" / "made.lock"
    (dest / lock.LOCK_NAME).symlink_to(aim)
    before = digest_tree(demo_ckpt)
    run = ckptflow("convert", str(demo_ckpt), str(dest), "--dequant", "--work", str(tmp_path / "w"))
    one_error_line(run, f"{dest / lock.LOCK_NAME} is a symbolic link to '{aim}'", "nothing was written")
    assert digest_tree(demo_ckpt) == before  # the shard behind the link kept every byte
    assert [p.name for p in dest.iterdir()] == [lock.LOCK_NAME]  # no file under a final name
    assert not (tmp_path / "elsewhere").exists()  # nothing made outside DEST


# The real CLI; its first shard goes through at once (then it touches $CKPTFLOW_TEST_WROTE), every
# later one waits for the file $CKPTFLOW_TEST_GO, so a test can act while it holds DEST.
GATED_CLI = """
import os, sys, threading, time
from ckptflow.flows.cli import entry as cli
cli._quiet_prefect(False)  # what console_main() does before Prefect is imported; the gate imports it first
import ckptflow.tasks.run.shard as st
real, done, mutex = st.write_shard, [], threading.Lock()
def gated(*a, **k):
    with mutex:
        first = not done
        done.append(1)
    deadline = time.monotonic() + 120
    while not first and not os.path.exists(os.environ["CKPTFLOW_TEST_GO"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    record = real(*a, **k)
    if first:
        open(os.environ["CKPTFLOW_TEST_WROTE"], "w").close()
    return record
st.write_shard = gated
sys.exit(cli.console_main())
"""


def _wait_for(ready, what: str, procs=(), timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in procs:
            assert p.poll() is None, f"exited while waiting for {what}: {p.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _dest_versions(fs, prefix: str) -> dict[str, tuple[str, str]]:
    fs.invalidate_cache()
    """key → (ETag, LastModified) of every object under `prefix` but the lock (its holder beats)."""
    return {o["Key"]: (o["ETag"], str(o["LastModified"]))
            for o in fs.call_s3("list_objects_v2", Bucket=prefix.split("/")[0],
                                Prefix=prefix.split("/", 1)[1] + "/").get("Contents", [])
            if not o["Key"].endswith(lock.LOCK_NAME)}


@pytest.mark.slow
def test_a_stopped_run_whose_lock_was_taken_over_writes_nothing_more(demo_ckpt, s3_options, tmp_path):
    import s3fs


    from .helpers import engine_convert, s3_tree, tree

    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    dest, lock_key = f"s3://{bucket}/out", f"{bucket}/out/{lock.LOCK_NAME}"
    stale = 3.0

    def start(n: int) -> subprocess.Popen:
        env = cli_env(CKPTFLOW_TEST_GO=str(tmp_path / f"go{n}"), CKPTFLOW_TEST_WROTE=str(tmp_path / f"wrote{n}"),
                      CKPTFLOW_LOCK_STALE_S=str(stale), CKPTFLOW_LOCK_HEARTBEAT_S="0.5")
        return subprocess.Popen([PYTHON, "-c", GATED_CLI, "convert", str(demo_ckpt), dest, "--dequant",
                                 "--storage-options", json.dumps(opts), "--work", str(tmp_path / f"w{n}")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def holder() -> dict:
        fs.invalidate_cache()
        try:
            return json.loads(fs.cat_file(lock_key))
        except FileNotFoundError:
            return {}

    first = start(1)
    second = None
    try:
        _wait_for(lambda: (tmp_path / "wrote1").exists(), "the first run's first shard", [first])
        os.kill(first.pid, signal.SIGSTOP)  # the CLI process alone: a suspended VM, a long GC pause
        _wait_for(lambda: time.time() - holder()["heartbeat"] > stale + 0.5, "the lock to go stale")
        second = start(2)
        _wait_for(lambda: (tmp_path / "wrote2").exists(), "the second run's first shard", [second])
        assert holder()["pid"] == second.pid  # taken over
        before = _dest_versions(fs, f"{bucket}/out")
        (tmp_path / "go1").touch()
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        for needle in (f"DEST {dest}: this run lost its lock", f"pid {second.pid}", "it stopped before writing"):
            assert needle in errors[0], errors[0]
        # No traceback of ours. (Prefect's temporary server, a child sharing stderr, may log one of
        # its own when the woken client's events websocket reconnects: its noise, not this run's.)
        assert "LockLost" not in err and str(ROOT) not in err, err[-3000:]
        assert _dest_versions(fs, f"{bucket}/out") == before  # not one object written after it woke
        assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
        assert holder()["pid"] == second.pid  # and its exit left the other run's lock alone
        (tmp_path / "go2").touch()
        out, err = second.communicate(timeout=180)
        assert second.returncode == 0, err[-3000:]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    clean = tmp_path / "clean"
    engine_convert(demo_ckpt, clean, tmp_path / "wc", dequant=True)
    assert s3_tree(fs, f"{bucket}/out") == tree(clean)  # byte for byte a clean conversion
    assert not fs.exists(lock_key)


def test_taking_over_a_stale_object_lock_reports_the_dead_holder(s3_dest, monkeypatch):
    """The hook `convert_flow` uses to mark the dead run's flow run Crashed hears of a takeover, with
    the dead holder's record; a lock that is free, or live, reports nothing."""
    # Stale after 30 s, not s3_dest's 1 s: the live lease below has no heartbeat thread, and on a
    # loaded machine more than 1 s passed before the second acquire (it took the lock over). The
    # dead holder's heartbeat is 60 s old: stale either way.
    monkeypatch.setenv("CKPTFLOW_LOCK_STALE_S", "30")
    heard = []
    dead = {"flow_run_id": "6f1c0000-0000-0000-0000-000000000001", "pid": 9, "host": "gone", "token": "t",
            "heartbeat": time.time() - 60}
    put_lock(s3_dest, json.dumps(dead).encode())
    lease = object_lock.acquire(s3_dest, {"flow_run_id": "mine"}, heard.append)
    assert [h["flow_run_id"] for h in heard] == [dead["flow_run_id"]]
    assert lock_json(s3_dest)["flow_run_id"] == "mine"  # the new record names this run
    with pytest.raises(lock.DestBusy):
        object_lock.acquire(s3_dest, None, heard.append)  # live: refused, nothing reported
    lease.release()
    object_lock.acquire(s3_dest, None, heard.append).release()  # free: created, nothing reported
    assert len(heard) == 1

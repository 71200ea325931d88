"""An S3 endpoint that stops answering mid-run: the run ends within 2 minutes with one `error:`
line naming the endpoint, and once the endpoint is back the same command resumes.

moto's server runs as a process of its own so that it can be SIGSTOPped: the kernel still accepts
connections and buffers requests for it, and nothing answers, which is what a hung endpoint does.
A forwarder between the CLI and moto stops moto the moment a chosen request starts to arrive (a
shard's first UploadPart, or its CompleteMultipartUpload), so each case hits its instant exactly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from .helpers import PYTHON, ROOT, cli_env, kill_group, run_main, s3_tree, start_moto_process, tree

MiB = 1 << 20
STALLED_SHARD = "model-00004-of-00005.safetensors"  # 9.6 MB of BF16 after dequant: 2 parts of 5 MiB


class StopOnRequest:
    """Forwards loopback TCP to `port`; SIGSTOPs `pid` just before passing on the first bytes
    that match `pattern` (a request line), so that request is never answered."""

    def __init__(self, port: int, pid: int, pattern: bytes):
        self.port, self.pid, self.pattern = port, pid, re.compile(pattern)
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped_at: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                return
            for s in (client, upstream):  # each piece goes on at once: no Nagle wait for the previous one's ACK
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        tail = b""
        try:
            while data := src.recv(1 << 16):
                if requests and self.stopped_at is None:
                    seen = tail + data
                    with self._lock:
                        if self.stopped_at is None and self.pattern.search(seen):
                            os.kill(self.pid, signal.SIGSTOP)
                            self.stopped_at = time.monotonic()
                    tail = seen[-1024:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def moto_process(tmp_path):
    proc, port = start_moto_process(tmp_path / "moto.log")
    try:
        yield {"port": port, "pid": proc.pid, "url": f"http://127.0.0.1:{port}"}
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        kill_group(proc)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An FP8 checkpoint whose 4th output shard needs a multipart upload at 5 MiB parts, and its
    local conversion (no Prefect, no S3): the bytes the resumed S3 run must end with."""
    from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    from .helpers import engine_convert

    base = tmp_path_factory.mktemp("stall")
    make_deepseek_v3_fp8(open_location(str(base / "src")), DeepSeekDims(vocab_size=6000, hidden_size=320,
                                                                         num_hidden_layers=2))
    engine_convert(base / "src", base / "want", base / "work", dequant=True)
    want = tree(base / "want")
    assert len(want[STALLED_SHARD]) > 5 * MiB
    return {"src": base / "src", "want": want}


def convert(src, dest: str, opts: dict, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "convert", str(src), dest, "--dequant",
                           "--storage-options", json.dumps(opts)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("instant, request_line, deadline_env, limit", [
    # 5 s a call plus the part's body (a little over 5 MiB) at 2 MiB/s: the body's share of the limit
    # shows as it does at the default 30 s (33 s), in a few seconds. That a CLI without the variable
    # gets the default 30 s is `test_the_cli_gets_the_default_deadline_without_the_variable`.
    ("upload", rb"PUT /[^ ]*/" + STALLED_SHARD.encode() + rb"\?[^ ]*partNumber=1", "5", "8 s (upload_part"),
    # A short limit, so this case costs seconds, not half a minute.
    ("complete", rb"POST /[^ ]*/" + STALLED_SHARD.encode() + rb"\?uploadId=", "5",
     "5 s (complete_multipart_upload"),
])
def test_a_silent_endpoint_fails_the_run_in_one_line_and_the_rerun_resumes(
        instant, request_line, deadline_env, limit, prefect_harness, moto_process, checkpoint, tmp_path):
    import boto3
    import s3fs

    bucket = "stall-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=moto_process["url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    proxy = StopOnRequest(moto_process["port"], moto_process["pid"], request_line)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": proxy.url},
            "default_block_size": 5 * MiB}  # s3fs's smallest part: a 9.6 MB shard is a multipart upload
    env = cli_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("CKPTFLOW_S3_DEADLINE_S", None)
    if deadline_env:
        env["CKPTFLOW_S3_DEADLINE_S"] = deadline_env
    dest = f"s3://{bucket}/out"

    t0 = time.monotonic()
    run = convert(checkpoint["src"], dest, opts, env, timeout=150)
    elapsed = time.monotonic() - t0
    out = run.stdout + run.stderr
    assert proxy.stopped_at is not None, f"the {instant} request never came:\n{out}"
    silent_for = time.monotonic() - proxy.stopped_at
    print(f"{instant}: {elapsed:.1f} s in all, {silent_for:.1f} s after the endpoint stopped")
    assert run.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: S3 endpoint {proxy.url} did not answer within {limit} of {dest}/{STALLED_SHARD}); "
                      "check it is up, then rerun: committed shards are kept"], out
    # Within 2 minutes of the endpoint going silent, and only one call's limit of it spent waiting
    # (the shards still queued, Prefect's records of them and the lock's release fail at once).
    seconds = float(limit.split()[0])
    assert silent_for < min(120, seconds + 30), (silent_for, elapsed)

    os.kill(moto_process["pid"], signal.SIGCONT)
    # The rerun is main(argv) in this process (run_main): the run that stalled is the real process
    # this test is about; what resumes is the CLI's code, less a new process's ~3 s of imports.
    again = run_main("convert", str(checkpoint["src"]), dest, "--dequant", "--storage-options", json.dumps(opts),
                     **({"CKPTFLOW_S3_DEADLINE_S": deadline_env} if deadline_env else {}))
    assert again.returncode == 0, again.stdout + again.stderr
    reused = re.search(r"^shards: +(\d+) written, (\d+) reused", again.stdout + again.stderr, re.M)
    assert reused and int(reused[2]) == 3, again.stdout + again.stderr  # shards 1-3 committed before the stall
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **{**opts, "client_kwargs": {"endpoint_url": moto_process["url"]}})
    assert s3_tree(fs, f"{bucket}/out") == checkpoint["want"]
    proxy.close()


def test_an_object_lock_left_by_a_run_gone_from_this_machine_is_taken_over(s3_options):
    """A run that failed because the store stopped answering could not delete its lock; its rerun on
    the same machine takes it over at once, not after `STALE_S`. A live holder still refuses."""
    from ckptflow.storage import lock
    from ckptflow.storage.lock_common import new_holder
    from ckptflow.storage.urls import open_location

    dst = open_location(f"s3://{s3_options['bucket']}/out", s3_options["options"])
    gone = subprocess.Popen([PYTHON, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        def leave_lock(pid: int, **changes) -> None:
            holder = {**new_holder(), "pid": pid, **changes}  # heartbeat: now, so not stale
            with dst.fs.open(dst.path(lock.LOCK_NAME), "wb") as f:
                f.write(json.dumps(holder).encode())

        for refused in ({"pid": alive.pid}, {"pid": gone.pid, "machine": "another-boot:1"},
                        {"pid": gone.pid, "host": "another-host"}):
            leave_lock(**refused)
            with pytest.raises(lock.DestBusy, match="is being written by another ckptflow run"):
                with lock.dest_lock(dst):
                    pass
        leave_lock(gone.pid)
        with lock.dest_lock(dst):
            with dst.fs.open(dst.path(lock.LOCK_NAME), "rb") as f:
                assert json.loads(f.read())["pid"] == os.getpid()
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------- the deadline, in-process


@pytest.fixture
def unanswered():
    """A port whose kernel accepts connections and takes request bytes, and nothing answers."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _silent_fs(endpoint: str, monkeypatch, seconds: str = "2"):
    from ckptflow.storage.urls import open_location

    monkeypatch.setenv("CKPTFLOW_S3_DEADLINE_S", seconds)
    return open_location("s3://bkt/x", {"key": "k", "secret": "s", "skip_instance_cache": True,
                                        "client_kwargs": {"endpoint_url": endpoint}}).fs


def test_a_call_to_a_silent_endpoint_ends_at_its_deadline_then_later_calls_fail_at_once(unanswered, monkeypatch):
    from ckptflow.storage.deadline import EndpointSilent
    from ckptflow.storage.transient import is_transient

    fs = _silent_fs(unanswered, monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(EndpointSilent) as first:
        fs.ls("bkt/x")
    assert 1.9 < time.monotonic() - t0 < 4
    assert str(first.value) == (f"S3 endpoint {unanswered} did not answer within 2 s (list_objects_v2 of s3://bkt); "
                                "check it is up, then rerun: committed shards are kept")
    assert not is_transient(first.value)  # Prefect must not run the shard again for it
    for call in (lambda: fs.cat_file("bkt/x/a", start=0, end=10),  # range reads: s3fs's second retry loop
                 lambda: fs.call_s3("abort_multipart_upload", Bucket="bkt", Key="x/a", UploadId="u")):
        t0 = time.monotonic()
        with pytest.raises(EndpointSilent, match="list_objects_v2"):
            call()
        assert time.monotonic() - t0 < 0.5


def test_a_body_the_endpoint_never_reads_ends_at_its_deadline(unanswered, monkeypatch):
    """aiohttp's read timeout starts only once the body is written: a part that fills the socket
    buffers waited with no limit. Now: the deadline plus the body at 2 MiB/s."""
    from ckptflow.storage.deadline import EndpointSilent

    fs = _silent_fs(unanswered, monkeypatch, "1")
    t0 = time.monotonic()
    with pytest.raises(EndpointSilent, match=r"within 5 s \(put_object of s3://bkt/x/big\)"):
        fs.pipe_file("bkt/x/big", bytes(8 * MiB))
    assert 4.9 < time.monotonic() - t0 < 8


def test_the_cli_gets_the_default_deadline_without_the_variable(s3_options, demo_ckpt, monkeypatch):
    """The CLI's code path (main(argv), `convert --dry-run`, which opens DEST and the work location
    and probes DEST as a run does before Prefect starts) with CKPTFLOW_S3_DEADLINE_S unset: every S3
    filesystem it opens is bounded at the default 30 s a call, the value the stall cases above,
    run with a short limit, would wait with no variable set."""
    import s3fs

    from ckptflow.storage import deadline

    monkeypatch.delenv("CKPTFLOW_S3_DEADLINE_S", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # no instance bounded earlier in this process is reused
    real, bounded = deadline.bound_s3_calls, []

    def spy(fs) -> None:
        real(fs)
        bounded.append(fs._ckptflow_deadline)

    monkeypatch.setattr(deadline, "bound_s3_calls", spy)
    opts = {**s3_options["options"], "default_block_size": 5 * MiB}
    run = run_main("convert", str(demo_ckpt), f"s3://{s3_options['bucket']}/out", "--dequant",
                   "--dry-run", "--storage-options", json.dumps(opts))
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(bounded) >= 2 and set(bounded) == {deadline.DEADLINE_S} == {30}, bounded  # DEST and work


def test_deadline_defaults_env_and_a_users_longer_timeouts(monkeypatch):
    from ckptflow.storage.deadline import DEADLINE_S, base_deadline
    from ckptflow.storage.urls import StorageError, open_location

    monkeypatch.delenv("CKPTFLOW_S3_DEADLINE_S", raising=False)
    fs = open_location("s3://b/k", {"key": "k", "secret": "s", "skip_instance_cache": True}).fs
    assert base_deadline(fs) == DEADLINE_S == 30
    slow = open_location("s3://b/k", {"skip_instance_cache": True, "config_kwargs": {"read_timeout": 120}}).fs
    assert base_deadline(slow) == 125  # one whole attempt at the user's own timeouts
    monkeypatch.setenv("CKPTFLOW_S3_DEADLINE_S", "soon")
    with pytest.raises(StorageError, match="CKPTFLOW_S3_DEADLINE_S must be a number of seconds above 0; got 'soon'"):
        open_location("s3://b/k", {"skip_instance_cache": True})

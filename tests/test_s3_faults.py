"""Object-storage faults as a user meets them: one `error:` line naming the URL, exit 2, fast, and
never a bucket created.

Every case runs against a real endpoint on loopback: moto's server (one with IAM auth enforced,
in a subprocess of its own, for credentials), a closed port, and a socket that accepts the
connection and never answers. The CLI runs as a subprocess, as a user runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from botocore import exceptions as botocore_errors

from .helpers import PYTHON, ROOT, cli_env, free_port, kill_group, start_moto_process

if sys.version_info < (3, 11):  # requires-python is 3.10; anyio brings the backport there
    from exceptiongroup import ExceptionGroup

# ------------------------------------------------------------------------------- endpoints


class SilentEndpoint:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte; lives at most `lifetime` s."""

    def __init__(self, lifetime: float = 180.0):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.sock.settimeout(0.5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.accepted += 1
            self._held.append(conn)  # held open, unread: the client waits for an answer
        self.sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()


@pytest.fixture
def silent_endpoint():
    server = SilentEndpoint()
    yield server
    server.close()


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """moto's server with IAM auth enforced after the first SETUP_ACTIONS requests, which make a
    bucket holding a small checkpoint and a user who may only read it."""
    import boto3

    setup_actions = 5  # create_bucket, put_object, create_user, create_access_key, put_user_policy
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_actions)}
    proc, port = start_moto_process(tmp_path_factory.mktemp("moto-auth") / "server.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="setup", aws_secret_access_key="setup",
                          region_name="us-east-1")
        iam = boto3.client("iam", endpoint_url=url, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        bucket = "auth-" + uuid.uuid4().hex[:8]
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="src/config.json", Body=b"{}")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        yield {"url": url, "bucket": bucket, "reader": {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}}
    finally:
        kill_group(proc)


# ---------------------------------------------------------------------------------- helpers


def ckptflow(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(run: subprocess.CompletedProcess, url: str, *words: str) -> str:
    """Exit 2, exactly one `error:` line, naming `url` and saying `words`; no traceback."""
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert url in errors[0], errors[0]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def options(endpoint: str, **extra) -> str:
    return json.dumps({"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}, **extra})


def bucket_exists(opts: dict, bucket: str) -> bool:
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    return bucket in {b.rstrip("/") for b in fs.ls("")}


# -------------------------------------------------------------------- DEST: missing buckets


@pytest.mark.slow
def test_convert_into_a_missing_bucket_stops_and_creates_no_bucket(s3_options, demo_ckpt, tmp_path):
    opts = s3_options["options"]
    missing = "nope-" + uuid.uuid4().hex[:8]
    dest = f"s3://{missing}/out"
    before = tree_digest(demo_ckpt)
    run = ckptflow("convert", str(demo_ckpt), dest, "--dequant", "--storage-options", json.dumps(opts),
                   "--work", str(tmp_path / "w"),
                   env=cli_env(PREFECT_HOME=str(tmp_path / "prefect-home")))
    # The CLI's pre-flight (ckptflow.storage.remote.check_writable_dest) names DEST, before Prefect starts.
    assert_one_error(run, f"{dest}: bucket {missing!r} does not exist; create it first", "never creates buckets")
    assert not bucket_exists(opts, missing)
    assert tree_digest(demo_ckpt) == before


def test_writers_never_create_a_bucket(s3_options):
    from ckptflow.storage.files import write_json
    from ckptflow.storage.remote import check_writable_dest
    from ckptflow.storage.urls import StorageError, open_location

    opts = s3_options["options"]
    missing = "nope-" + uuid.uuid4().hex[:8]
    loc = open_location(f"s3://{missing}/out", opts)
    with pytest.raises(StorageError, match=rf"^s3://{missing}/out: bucket '{missing}' does not exist; "
                                           r"create it first \(ckptflow never creates buckets\)$"):
        check_writable_dest(loc)
    with pytest.raises(FileNotFoundError):  # the writer itself: no makedirs, so PutObject fails
        write_json(loc, "sub/dir/config.json", {"a": 1})
    assert not bucket_exists(opts, missing)

    # In a bucket that exists, nested names need no "directories": the file lands, nothing else.
    bucket = s3_options["bucket"]
    ok = open_location(f"s3://{bucket}/out", opts)
    check_writable_dest(ok)
    write_json(ok, "sub/dir/config.json", {"a": 1})
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    assert fs.find(bucket) == [f"{bucket}/out/sub/dir/config.json"]
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []  # the probe was aborted


def test_remote_work_in_a_missing_bucket_is_refused_before_prefect_writes(s3_options):
    """Prefect's RemoteFileSystem calls makedirs before each record: with s3fs, that makes buckets."""
    from ckptflow.flows.workdir import result_storage
    from ckptflow.storage.urls import StorageError

    opts = s3_options["options"]
    missing = "nope-" + uuid.uuid4().hex[:8]
    with pytest.raises(StorageError, match=f"bucket '{missing}' does not exist"):
        result_storage(f"s3://{missing}/work", opts)
    assert not bucket_exists(opts, missing)


# ------------------------------------------------------------------------ credentials


def test_bad_and_read_only_credentials(auth_s3, tmp_path):
    from ckptflow.storage.remote import check_writable_dest
    from ckptflow.storage.urls import StorageError, open_location

    src = f"s3://{auth_s3['bucket']}/src"
    run = ckptflow("validate", src, "--storage-options",
                   json.dumps({"key": "AKIANOTAREALKEY00000", "secret": "wrong",
                               "client_kwargs": {"endpoint_url": auth_s3["url"]}}))
    assert_one_error(run, src, "rejected the credentials", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID")

    # The reader may list and read, not write: the pre-flight says so before a run writes anything.
    reader = {**auth_s3["reader"], "client_kwargs": {"endpoint_url": auth_s3["url"]}, "skip_instance_cache": True}
    with pytest.raises(StorageError, match=rf"^{src}/out: access denied \(CreateMultipartUpload\)"):
        check_writable_dest(open_location(f"{src}/out", reader))


def test_missing_credentials(s3_endpoint, s3_options):
    env = {k: v for k, v in cli_env().items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    src = f"s3://{s3_options['bucket']}/src"
    t0 = time.monotonic()
    run = ckptflow("validate", src, "--storage-options", json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}}),
                   env=env)
    assert_one_error(run, src, "no storage credentials found", "AWS_ACCESS_KEY_ID", "--storage-options")
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------- network


def test_closed_port(s3_options):
    port = free_port()  # bound and released: nothing listens there
    src = f"s3://{s3_options['bucket']}/src"
    t0 = time.monotonic()
    run = ckptflow("validate", src, "--storage-options", options(f"http://127.0.0.1:{port}"))
    assert_one_error(run, src, f"cannot connect to http://127.0.0.1:{port}", "connection refused", "endpoint")
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_within_a_minute(silent_endpoint):
    src = "s3://bucket/src"
    # The shipped limits scaled down ten-fold, so the race of the retries against the deadline takes
    # seconds, not 30: 1 s reads under a 3 s deadline (shipped: 8 s reads under 30 s). The same
    # attempts run (2 botocore × 2 s3fs, the shipped counts: 4 take over 4 s here, so the deadline
    # ends them as it does at 30 s). The shipped values a CLI gets with neither set are held by
    # test_s3_defaults_bound_timeouts_and_retries_and_yield_to_the_user and test_s3_stall's
    # test_the_cli_gets_the_default_deadline_without_the_variable.
    deadline_s = 3
    opts, env = options(silent_endpoint.url, config_kwargs={"read_timeout": 1}), cli_env(CKPTFLOW_S3_DEADLINE_S="3")
    t0 = time.monotonic()
    run = ckptflow("validate", src, "--storage-options", opts, env=env, timeout=120)
    elapsed = time.monotonic() - t0
    # The listing's deadline (ckptflow.storage.deadline: one limit over all its retries) ends it.
    assert_one_error(run, f"S3 endpoint {silent_endpoint.url} did not answer within {deadline_s} s (list_objects_v2 "
                     "of s3://bucket); check it is up, then rerun")
    assert elapsed < deadline_s + 15, elapsed  # the deadline, and the CLI's start
    assert 2 <= silent_endpoint.accepted <= 4, silent_endpoint.accepted  # at most 2 s3fs × 2 botocore attempts


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("bad, words", [
    ({"client_kwargs": 5}, ("client_kwargs must be a JSON object", "got 5")),
    ({"bogus": 1}, ("has no option 'bogus'",)),
    ({"client_kwargs": {"endpoint": "http://x"}}, ("client_kwargs has no option 'endpoint'",)),
    ({"config_kwargs": {"read_timeout": "soon"}}, ("config_kwargs.read_timeout must be a number",)),
    ({"config_kwargs": {"retry": 3}}, ("config_kwargs is not a valid botocore Config",)),
])
def test_malformed_storage_options_name_the_option(bad, words):
    from ckptflow.storage.urls import StorageError, open_location

    with pytest.raises(StorageError) as info:
        open_location("s3://bucket/src", {"key": "k", "secret": "s", **bad})
    message = str(info.value)
    assert message.startswith("s3://bucket/src: --storage-options ") and "\n" not in message
    for w in words:
        assert w in message, message


def test_malformed_storage_options_on_the_command_line(tmp_path):
    run = ckptflow("validate", "s3://bucket/src", "--storage-options", '{"client_kwargs": 5}')
    assert_one_error(run, "s3://bucket/src", "client_kwargs must be a JSON object")


def test_s3_defaults_bound_timeouts_and_retries_and_yield_to_the_user(monkeypatch):
    from ckptflow.storage.urls import open_location

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    fs = open_location("s3://b/k", {"key": "k", "secret": "s", "skip_instance_cache": True}).fs
    assert fs.config_kwargs == {"connect_timeout": 5, "read_timeout": 8,
                                "retries": {"total_max_attempts": 2, "mode": "standard"}}
    assert fs.retries == 2 and s3fs.S3FileSystem.retries == 5  # the instance's, not the class's

    mine = {"read_timeout": 120, "retries": {"max_attempts": 10, "mode": "adaptive"}}
    fs = open_location("s3://b/k", {"config_kwargs": mine, "skip_instance_cache": True}).fs
    assert fs.config_kwargs == {**mine, "connect_timeout": 5}
    assert mine == {"read_timeout": 120, "retries": {"max_attempts": 10, "mode": "adaptive"}}  # not mutated

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # botocore reads it unless retries is passed explicitly
    fs = open_location("s3://b/k", {"skip_instance_cache": True}).fs
    assert "retries" not in fs.config_kwargs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # retries turned off stay off
    assert open_location("s3://b/k", {"skip_instance_cache": True}).fs.retries == 1


# ----------------------------------------------------------------- explain: the table itself


def _client_error(code: str, operation: str = "PutObject", bucket: str | None = None, status: int = 403):
    error = {"Code": code, "Message": f"{code} said the server"}
    if bucket:
        error["BucketName"] = bucket
    return botocore_errors.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def _translated(inner: BaseException, outer: BaseException) -> BaseException:
    """`outer` raised from `inner`, as s3fs's translate_boto_error and Prefect's re-raises chain them."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("make, words", [
    (lambda: _translated(_client_error("ExpiredToken"), PermissionError("expired")), ("credentials have expired",)),
    (lambda: _translated(_client_error("AccessDenied", bucket="b"), PermissionError("Access Denied")),
     ("s3://b: access denied (PutObject)", "IAM")),
    (lambda: _translated(_client_error("SignatureDoesNotMatch"), PermissionError("x")),
     ("rejected the credentials (SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")),
    (lambda: _translated(_client_error("404", "HeadBucket", status=404), FileNotFoundError("Not Found")),
     ("the bucket does not exist",)),
    (lambda: _translated(_client_error("NoSuchBucket", "ListObjectsV2", bucket="gone", status=404),
                         FileNotFoundError("The specified bucket does not exist")), ("s3://gone: bucket 'gone'",)),
    (lambda: botocore_errors.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
     ("incomplete credentials", "AWS_SECRET_ACCESS_KEY")),
    (lambda: botocore_errors.ConnectTimeoutError(endpoint_url="http://10.9.9.9/b?x=1"),
     ("connecting to http://10.9.9.9/b timed out",)),
    (lambda: _translated(botocore_errors.NoCredentialsError(), RuntimeError("task failed")),
     ("no storage credentials found",)),
    (lambda: ExceptionGroup("tasks", [ValueError("a bug"), OSError(28, "No space left on device", "/d/x")]),
     ("/d/x: no space left on the device",)),
    (lambda: PermissionError(13, "Permission denied", "/ro/out"), ("/ro/out: permission denied",)),
])
def test_explain_names_the_place_and_what_to_do(make, words):
    from ckptflow.storage.faults import explain

    line = explain(make())
    assert line is not None and "\n" not in line
    for w in words:
        assert w in line, line


def test_explain_leaves_bugs_alone():
    from ckptflow.storage.faults import explain

    assert explain(KeyError("weight")) is None
    assert explain(_translated(ValueError("bad shape"), RuntimeError("task failed"))) is None
    assert explain(_translated(_client_error("NoSuchKey", "GetObject", status=404), FileNotFoundError("k"))) is None

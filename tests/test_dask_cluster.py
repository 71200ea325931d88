"""A Dask cluster of separate machines sharing only a bucket and a Prefect server.

`dask scheduler` and two `dask worker`s run as processes of their own, each worker with its own
HOME and working directory and an environment of its own (what README's "Running on a Dask
cluster" tells an operator to set on every worker); the CLI runs from yet another HOME. SOURCE,
DEST and, by default, the work location (journal, shard records) are in a moto S3 bucket; the
Prefect server is the session's shared one on loopback (conftest's `prefect_server`). Faults: the
client SIGKILLed mid-run and rerun from a third HOME; a worker SIGKILLed after its shard committed;
a worker without storage credentials. Worker-side timing comes from `tests/dask_preload.py`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from . import prefect_servers
from .helpers import PYTHON, ROOT, dequant_reference, free_port, kill_group, s3_tree, sigkill_when, tree

pytestmark = pytest.mark.slow

PRELOAD = ROOT / "tests" / "dask_preload.py"


def machine_env(home: Path, api_url: str, s3_endpoint: str | None, **extra: str) -> dict[str, str]:
    """The environment of one machine of the cluster: nothing from this one but PATH, so a setting
    the guide forgets is missing here too. `s3_endpoint=None`: no storage credentials at all."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-role lookup on a machine without keys
    if s3_endpoint is not None:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                   AWS_ENDPOINT_URL=s3_endpoint)
    if os.environ.get("TRITON_INTERPRET"):  # no GPU here: Triton's CPU interpreter (conftest.py)
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    env.update(extra)
    return env


class Cluster:
    """Workers, as separate processes, of the module's `dask scheduler` (`scheduler`); `stop()` kills
    them and waits until the scheduler has dropped them, so the next test's cluster is its own."""

    def __init__(self, base: Path, address: str):
        self.base, self.address = base, address
        base.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, cwd: Path, env: dict[str, str], args: list[str]) -> subprocess.Popen:
        self.procs[name] = start_process(self.base / f"{name}.log", cwd, env, args)
        return self.procs[name]

    def add_worker(self, name: str, env: dict[str, str]) -> subprocess.Popen:
        """One single-threaded worker, no nanny (its pid is the pid that runs shard tasks, and a
        killed worker stays dead), working in its own HOME."""
        home = Path(env["HOME"])
        return self._start(name, home, env, [
            "distributed.cli.dask_worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
            "--no-dashboard", "--local-directory", str(home / "dask"), "--preload", str(PRELOAD)])

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(n, timeout=timeout)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no worker thread runs a task: a task a dead client left running still finishes
        (Dask cannot stop a running thread) and may commit its shard."""
        from distributed import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=30) as client:
            while sum(client.run(lambda dask_worker: len(dask_worker.active_threads)).values()):
                assert time.monotonic() < deadline, "the workers never went idle"
                time.sleep(0.2)

    def no_shard_delay(self) -> None:
        """Every worker's CKPTFLOW_TEST_SHARD_DELAY off from now on (`tests/dask_preload.py`, loaded as
        the module `dask_preload` in each worker)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.run(lambda: setattr(sys.modules["dask_preload"], "_DELAY", 0.0))

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        """SIGKILL the workers (how they exit is no test's concern; a graceful stop took seconds each),
        then wait until the scheduler has dropped them: it does on the closed connection."""
        from distributed import Client

        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # a test killed it already
                pass
            proc.wait()
        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=30) as client:
            while client.scheduler_info()["workers"]:
                assert time.monotonic() < deadline, "the scheduler kept a killed worker"
                time.sleep(0.05)


def start_process(log_path: Path, cwd: Path, env: dict[str, str], args: list[str]) -> subprocess.Popen:
    """`python -m ARGS` in a session of its own, its output in `log_path`."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen([PYTHON, "-m", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """One `dask scheduler` process for the module's tests (each test has workers of its own): no test
    here kills or inspects the scheduler, and each start cost a Python process its imports."""
    base = tmp_path_factory.mktemp("dask-scheduler")
    port = free_port()
    proc = start_process(base / "scheduler.log", base, {"PATH": os.environ["PATH"], "HOME": str(base)},
                         ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--no-dashboard"])
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        kill_group(proc, grace=5)


@pytest.fixture
def cluster(scheduler, tmp_path):
    c = Cluster(tmp_path / "cluster", scheduler)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def bucket_ckpt(s3_options, demo_ckpt, tmp_path):
    """The demo checkpoint (6 output shards) uploaded to s3://BUCKET/src, and its local conversion:
    the bytes every cluster run must give."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"])
    b = s3_options["bucket"]
    fs.put(str(demo_ckpt) + "/", f"{b}/src/", recursive=True)
    reference = tmp_path / "reference"
    dequant_reference(demo_ckpt, reference, tmp_path / "ref-work")
    return {"fs": fs, "bucket": b, "source": f"s3://{b}/src", "reference": tree(reference)}


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([PYTHON, "-m", "ckptflow.flows.cli", *args], env=env, cwd=env["HOME"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout)
    finally:
        kill_group(proc, grace=5)
    return log.read_text(errors="replace")


def summary_of(output: str) -> dict[str, Any]:
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def journal(fs, bucket: str) -> dict[str, dict[str, Any]]:
    """The final commit journal entries under the default work location of s3://BUCKET/out, by file."""
    fs.invalidate_cache()
    prefix = f"{bucket}/.ckptflow-work/out/journal"
    entries = {}
    for path in fs.find(prefix):
        try:
            record = json.loads(fs.cat_file(path))
        except (ValueError, FileNotFoundError):
            continue
        if record.get("identity"):
            entries[record["name"]] = record
    return entries


def etags(fs, bucket: str, files) -> dict[str, tuple[str, Any]]:
    fs.invalidate_cache()
    return {f: (i["ETag"], i["LastModified"]) for f in files for i in [fs.info(f"{bucket}/out/{f}")]}


def flow_run_state(flow_run_id: str, api_url: str) -> str:
    """The flow run's state type as the server records it, read over its REST API (a `get_client()`
    subprocess would spend seconds importing Prefect)."""
    return prefect_servers.rest(f"{api_url}/flow_runs/{flow_run_id}")["state_type"]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_killed_client_resumes_from_another_machine(prefect_server, s3_endpoint, bucket_ckpt, cluster, tmp_path):
    """README's multi-machine setup, step by step: two workers of their own (HOME, working dir,
    credentials, PREFECT_API_URL), a client with no --work. The client is SIGKILLed once a shard
    committed; the same command from a third machine resumes, reusing every committed shard."""
    fs, b, api = bucket_ckpt["fs"], bucket_ckpt["bucket"], prefect_server["url"]
    for name in ("w1", "w2"):  # every shard waits 1.5 s before it is published: time to kill mid-run
        cluster.add_worker(name, machine_env(tmp_path / name, api, s3_endpoint, CKPTFLOW_TEST_SHARD_DELAY="1.5"))
    cluster.wait_for_workers(2)
    command = ["convert", bucket_ckpt["source"], f"s3://{b}/out", "--dequant", "--task-runner", "dask",
               "--dask-address", cluster.address, "--json"]
    # README: the DEST lease, shortened alike on every client (90 s; heartbeat every 4 / 4.5 s). Only the
    # wait below depends on it: 4 s proves the same takeover as 90 s, and nothing here competes for the
    # lock while a client is alive, so a late heartbeat under load cannot cost a live client its lock.
    stale = {"CKPTFLOW_LOCK_STALE_S": "4"}
    log = tmp_path / "client1.log"
    first = start_cli(command, machine_env(tmp_path / "client1", api, s3_endpoint, **stale), log)
    sigkill_when(first, lambda: journal(fs, b))
    assert first.returncode == -signal.SIGKILL, log.read_text(errors="replace")
    cluster.wait_idle()  # tasks the dead client left running finish (and may commit) first
    committed = journal(fs, b)
    assert 1 <= len(committed) < 6, sorted(committed)
    assert {r["worker"].rsplit(":", 1)[1] for r in committed.values()} <= {
        str(p.pid) for p in cluster.procs.values()}
    before = etags(fs, b, committed)

    # The dead client's lock on DEST holds until its last heartbeat is CKPTFLOW_LOCK_STALE_S old; then
    # the rerun takes it over (a rerun before that is refused naming the holder: tests/test_lock.py).
    from ckptflow.storage.lock import LOCK_NAME

    held = json.loads(fs.cat_file(f"{b}/out/{LOCK_NAME}"))
    assert held["pid"] == first.pid
    time.sleep(max(0.0, float(held["heartbeat"]) + 4 + 1 - time.time()))
    cluster.no_shard_delay()  # the delay gave time to kill the first client; nothing kills the rerun

    log = tmp_path / "client3.log"
    third = start_cli(command, machine_env(tmp_path / "client3", api, s3_endpoint, **stale), log)
    output = finish(third, log)
    assert third.returncode == 0, output
    summary = summary_of(output)
    assert (summary["shards"], summary["cached_shards"]) == (6, len(committed)), summary
    assert etags(fs, b, committed) == before  # reused, not rewritten
    assert s3_tree(fs, f"{b}/out") == bucket_ckpt["reference"]
    assert not (tmp_path / "client3" / ".cache" / "ckptflow").exists()  # no --work: nothing on the client
    assert flow_run_state(held["flow_run_id"], api) == "CRASHED"  # the takeover closed the dead run


def test_a_worker_killed_after_its_commit_costs_no_recompute(prefect_server, s3_endpoint, bucket_ckpt, cluster,
                                                             tmp_path):
    """Worker A commits a shard and is SIGKILLed before Dask hears of it; Dask resubmits that task to
    worker B, whose run finds the journal entry A wrote and reuses the shard: same object, same ETag."""
    fs, b, api = bucket_ckpt["fs"], bucket_ckpt["bucket"], prefect_server["url"]
    a = cluster.add_worker("a", machine_env(tmp_path / "a", api, s3_endpoint, CKPTFLOW_TEST_HOLD_AFTER_COMMIT="1"))
    cluster.add_worker("b", machine_env(tmp_path / "b", api, s3_endpoint))
    cluster.wait_for_workers(2)
    log = tmp_path / "client.log"
    client = start_cli(["convert", bucket_ckpt["source"], f"s3://{b}/out", "--dequant", "--task-runner", "dask",
                        "--dask-address", cluster.address, "--json"],
                       machine_env(tmp_path / "client", api, s3_endpoint), log)
    worker_a = f"{socket.gethostname()}:{a.pid}"
    by_a = wait_for(lambda: [r for r in journal(fs, b).values() if r["worker"] == worker_a], 180,
                    "worker a committed no shard:\n" + log.read_text(errors="replace"))
    assert len(by_a) == 1
    shard = by_a[0]["name"]
    before = etags(fs, b, [shard])
    os.kill(a.pid, signal.SIGKILL)  # A holds the task: its result never reached the scheduler

    output = finish(client, log)
    assert client.returncode == 0, output + cluster.log("b")
    summary = summary_of(output)
    assert (summary["shards"], summary["cached_shards"]) == (6, 1), summary
    assert etags(fs, b, [shard]) == before  # not rewritten
    assert journal(fs, b)[shard]["worker"] == worker_a
    reused = [line for line in cluster.log("b").splitlines() if "shard reused" in line]
    assert len(reused) == 1 and f"file={shard}" in reused[0] and worker_a in reused[0], cluster.log("b")
    assert s3_tree(fs, f"{b}/out") == bucket_ckpt["reference"]


def test_a_shard_error_on_a_worker_names_the_worker(prefect_server, s3_endpoint, bucket_ckpt, cluster, tmp_path):
    """A worker machine set up without the storage credentials (the client has them, so planning
    works): the one `error:` line says which worker to fix."""
    b, api = bucket_ckpt["bucket"], prefect_server["url"]
    worker = cluster.add_worker("bare", machine_env(tmp_path / "bare", api, None))
    cluster.wait_for_workers(1)
    log = tmp_path / "client.log"
    client = start_cli(["convert", bucket_ckpt["source"], f"s3://{b}/out", "--dequant", "--task-runner", "dask",
                        "--dask-address", cluster.address],
                       machine_env(tmp_path / "client", api, s3_endpoint), log)
    output = finish(client, log)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert client.returncode == 2 and len(errors) == 1, output
    assert f"{socket.gethostname()}:{worker.pid}" in errors[0] and "AWS_ACCESS_KEY_ID" in errors[0], output
    assert "Traceback" not in output, output

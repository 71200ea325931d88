"""Operations: scale-out runners against a real Prefect server, storage faults, parameter checks.

The runner tests run the CLI in subprocesses with `PREFECT_API_URL` pointing at the session's
shared Prefect server (conftest's `prefect_server`): multi-process runners need a server every
process talks to. That server is shared with every other test, so a test here finds its own runs
(by flow run id or parameters), and the one that sets a global tag concurrency limit does it on a
server of its own. The fault tests put a small HTTP proxy in front of moto that drops
connections on chosen requests, so every byte still goes over real HTTP.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from . import prefect_servers
from .helpers import PYTHON, ROOT, dequant_reference, kill_group, run_main, server_env
from .helpers import tree

# ------------------------------------------------------------------------ a real Prefect server


def run_cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([PYTHON, "-m", "ckptflow.flows.cli", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc, grace=5)  # a Dask LocalCluster's workers go with their group
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.pid = proc.pid  # the CLI process, as shard records name their worker
    return done


def shard_workers(work: Path) -> set[str]:
    """The `worker` (host:pid) of every shard record persisted under the work location."""
    workers = set()
    for path in (work / "results").iterdir():
        record = json.loads(json.loads(path.read_text())["result"])
        workers.add(record["worker"])
    return workers


def convert(demo_ckpt: Path, base: Path, name: str, env: dict[str, str], *extra: str) -> tuple[Path, str]:
    """The CLI's conversion of `demo_ckpt` under `base`: its output folder, and the CLI process as shard
    records name a worker (host:pid)."""
    out, work = base / f"out-{name}", base / f"work-{name}"
    proc = run_cli(["convert", str(demo_ckpt), str(out), "--dequant", "--work", str(work), "--json", *extra], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Without -v no log record at INFO reaches the terminal, the workers' included (Dask's worker banners
    # did, from LocalCluster workers forked where Prefect had set up logging first).
    assert "| INFO" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cached_shards"] == 0 and summary["shards"] == 6
    return out, f"{socket.gethostname()}:{proc.pid}"


@pytest.fixture(scope="session")
def threaded_output(prefect_server, prefect_harness, tmp_path_factory):
    """The threaded CLI run of the demo checkpoint: the bytes every runner must reproduce. Made once per
    xdist worker that runs a test needing it: a worker may get this module's tests in several batches,
    between which a module-scoped fixture would be torn down and made again. It runs in this process
    (`run_main`: the CLI's main(argv), its flow on the shared server): only the runners under test need
    processes of their own, and a CLI subprocess spent seconds of CPU importing torch and Prefect."""
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    base = tmp_path_factory.mktemp("runners")
    src = base / "fp8"
    make_deepseek_v3_fp8(open_location(str(src)))
    env = server_env(prefect_server["home"], PREFECT_API_URL=prefect_server["url"])
    out, work = base / "out-threads", base / "work-threads"
    proc = run_main("convert", str(src), str(out), "--dequant", "--work", str(work), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cached_shards"] == 0 and summary["shards"] == 6
    return {"source": src, "base": base, "env": env, "tree": tree(out), "work": work}


@pytest.mark.slow
def test_dask_local_cluster_matches_threads_on_two_workers(threaded_output):
    t = threaded_output
    out, cli = convert(t["source"], t["base"], "dask", t["env"], "--task-runner", "dask", "--max-workers", "2")
    assert tree(out) == t["tree"]
    workers = shard_workers(t["base"] / "work-dask")
    assert len(workers) == 2, f"shard tasks ran on {workers}, expected both Dask workers"
    assert cli not in workers, "Dask shard tasks ran in the CLI's own process"


@pytest.mark.slow
def test_process_pool_as_a_flow_parameter_matches_threads(threaded_output, prefect_harness):
    """`task_runner="processes"` as a parameter (as a deployment run passes it, with no
    `with_options`): the flow submits its shards to a process pool, within the one flow run. The flow
    runs in this process (the pool's workers are processes of their own), as the threaded reference did:
    no shard record may name this process."""
    import asyncio
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterStartTime)

    from ckptflow.flows.convert import convert_flow

    t = threaded_output
    out, work = t["base"] / "out-processes", t["base"] / "work-processes"

    async def runs(since):  # this run's DEST is its own: other tests' runs on the server never match
        async with get_client() as c:
            found = await c.read_flow_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
            return [r.id for r in found if r.parameters.get("dest") == str(out)]

    async def artifacts(run):
        async with get_client() as c:
            return len(await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run]))))

    since = datetime.now(timezone.utc)
    state = convert_flow(str(t["source"]), str(out), work=str(work), dequant=True, task_runner="processes",
                         max_workers=2, return_state=True)
    s = state.result()
    got = {**{k: s[k] for k in ("shards", "cached_shards")}, "flow_runs": len(set(asyncio.run(runs(since)))),
           "artifacts": asyncio.run(artifacts(state.state_details.flow_run_id))}
    # One flow run (no subflow on the other runner), and the run the caller started holds the artifacts.
    assert {k: got[k] for k in ("shards", "cached_shards", "flow_runs")} == {"shards": 6, "cached_shards": 0,
                                                                              "flow_runs": 1}, got
    assert got["artifacts"] >= 1, got
    assert tree(out) == t["tree"]
    assert not shard_workers(work) & shard_workers(t["work"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["processes", "dask"])
def test_local_workers_on_the_temporary_server_match_threads(threaded_output, tmp_path, kind):
    """No PREFECT_API_URL: the CLI's temporary server is given to the local workers (a process
    pool, a Dask LocalCluster), which run the shards, on both workers, with the same bytes."""
    t = threaded_output
    env = server_env(tmp_path / "home")  # no server URL at all
    out, cli = convert(t["source"], tmp_path, kind, env, "--task-runner", kind, "--max-workers", "2")
    assert tree(out) == t["tree"]
    workers = shard_workers(tmp_path / f"work-{kind}")
    assert len(workers) == 2, f"shard tasks ran on {workers}, expected both local workers"
    assert cli not in workers, f"{kind} shard tasks ran in the CLI's own process"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "watch"])
def test_remote_dask_without_a_server_says_what_to_do(demo_ckpt, tmp_path, command):
    env = server_env(tmp_path / "home")
    # --work on storage a remote cluster could reach (a local one is refused first, naming --work)
    where = [str(demo_ckpt), str(tmp_path / "out"), "--work", "memory://ckptflow-work/out"] if command == "convert" \
        else [str(demo_ckpt.parent), "memory://ckptflow-dest/out", "--work-prefix", "memory://ckptflow-work/out"]
    proc = run_cli([command, *where, "--dequant", "--task-runner", "dask", "--dask-address", "tcp://127.0.0.1:9"],
                   env, timeout=120)
    assert proc.returncode == 2
    assert "PREFECT_API_URL" in proc.stderr and "--dask-address" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    # Refused with no temporary server started for it (its workers could not reach one): a server would
    # have opened the database on this PREFECT_HOME (prefect.db-wal, -shm), seconds of start-up spent.
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["prefect.db"]


# ---------------------------------------------------------------------------- runner selection


def test_make_task_runner_kinds(monkeypatch):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from ckptflow.flows.runtime.runners import RunnerError, make_task_runner, runner_kind

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    threads = make_task_runner("threads", 3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    assert isinstance(make_task_runner("processes", 2), ProcessPoolTaskRunner)
    local = make_task_runner("dask", 2)
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["processes"] is True and local.cluster_kwargs["threads_per_worker"] == 1
    remote = make_task_runner("dask", dask_address="tcp://10.0.0.1:8786")
    assert remote.address == "tcp://10.0.0.1:8786"
    assert [runner_kind(r) for r in (threads, make_task_runner("processes", 2), local)] == \
        ["threads", "processes", "dask"]
    with pytest.raises(RunnerError, match="unknown task runner 'ray'"):
        make_task_runner("ray")
    with pytest.raises(RunnerError, match="--dask-address is for --task-runner dask"):
        make_task_runner("threads", dask_address="tcp://x:1")


def test_process_pool_workers_fork_from_a_server_that_imported_torch():
    """A `processes` pool's workers are forks of one fork server that has torch loaded, not fresh
    interpreters that each import it (3.5 CPU-s and 195 MB each); duplicated runners (Prefect's
    `with_options`) keep that."""
    from ckptflow.flows.runtime.preloaded_pool import PreloadedProcessPool

    with PreloadedProcessPool(max_workers=1).duplicate() as pool:
        parent = pool._executor.submit(os.getppid).result(timeout=120)
        assert parent != os.getpid()
        assert "multiprocessing.forkserver" in Path(f"/proc/{parent}/cmdline").read_text()
        assert "libtorch_cpu" in Path(f"/proc/{parent}/maps").read_text()


def test_invalid_flow_parameters_are_rejected():
    from prefect.exceptions import ParameterTypeError

    from ckptflow.flows.convert import convert_flow

    ok = convert_flow.validate_parameters({"source": "s3://b/in", "dest": "s3://b/out", "mp": "2"})
    assert ok["mp"] == 2  # coerced the way a deployment's --param string is
    with pytest.raises(ParameterTypeError, match="task_runner"):
        convert_flow.validate_parameters({"source": "a", "dest": "b", "task_runner": "gpu-cluster"})
    with pytest.raises(ParameterTypeError, match="mp"):
        convert_flow.validate_parameters({"source": "a", "dest": "b", "mp": "two"})
    with pytest.raises(ParameterTypeError, match="dest"):
        convert_flow.validate_parameters({"source": "a"})


# ------------------------------------------------------------------------------ storage faults


class FaultyProxy:
    """An HTTP/1.1 proxy on loopback in front of moto; rules pick requests to break: "drop" closes
    the connection without a response, "deny" answers 403 AccessDenied, "delay" forwards the
    request after `delay` seconds (a slow store)."""

    def __init__(self, upstream: str, delay: float = 0.5):
        self.delay = delay
        self.upstream = upstream.split("//", 1)[1]
        self.rules: list[tuple] = []  # (predicate, action, remaining)
        self.seen: dict[str, int] = {"drop": 0, "deny": 0, "delay": 0, "ok": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no delayed-ACK wait

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                body = self._read_body()
                self.headers["X-Request-Path"] = self.path
                action = proxy._action(self.command, self.headers)
                if action == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if action == "deny":
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                           b"<Message>Access Denied</Message></Error>")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if action == "delay":
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                                "x-request-path")}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else (b"" if self.command in ("PUT", "POST") else None)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_rule(self, predicate, action: str, times: int) -> None:
        with self.lock:
            self.rules.append([predicate, action, times])

    def _action(self, method: str, headers) -> str:
        with self.lock:
            for rule in self.rules:
                predicate, action, remaining = rule
                if remaining > 0 and predicate(method, headers):
                    rule[2] -= 1
                    self.seen[action] += 1
                    return action
            self.seen["ok"] += 1
            return "ok"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def data_range_read(method: str, headers) -> bool:
    """A ranged GET past the start of an object, of at least 512 bytes: shard tasks reading tensor
    bytes (the flow itself reads headers from offset 0, small JSON files whole, and at planning
    the few bytes of per-tensor scales, `tasks/run/scale_preflight.py`)."""
    rng = headers.get("Range") or ""
    if method != "GET" or not rng.startswith("bytes=") or rng.startswith("bytes=0-"):
        return False
    first, _, last = rng[len("bytes="):].partition("-")
    return not last or int(last) - int(first) + 1 >= 512


class SameRequest:
    """Matches the first request `first` matches, and then only retries of that very request
    (same path and range): a connection that keeps dropping for one read, which outlasts the
    HTTP stack's own retries (aiohttp re-sends on a reused connection; botocore, s3fs)."""

    def __init__(self, first):
        self.first, self.key = first, None

    def __call__(self, method: str, headers) -> bool:
        key = (method, headers.get("Range"), headers.get("X-Request-Path"))
        if self.key is None and self.first(method, headers):
            self.key = key
        return key == self.key


@pytest.fixture
def faulty_s3(s3_endpoint, s3_options, monkeypatch):
    """s3 options through the proxy, with s3fs's and botocore's own retries off, so a dropped
    connection reaches the shard task and only ckptflow's retry can save the run."""
    import s3fs

    proxy = FaultyProxy(s3_endpoint)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    direct = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"])
    yield {"proxy": proxy, "options": opts, "bucket": s3_options["bucket"], "direct": direct}
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def _task_run_counts(flow_run_id) -> list[int]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [r.run_count for r in runs if r.name.startswith("dequant ")]  # "dequant FILE"

    return asyncio.run(read())


@pytest.mark.slow
def test_dropped_connections_are_retried_and_output_is_exact(prefect_harness, faulty_s3, demo_ckpt, tmp_path,
                                                             monkeypatch):
    from ckptflow.flows.convert import convert_flow

    from ckptflow.tasks.run.shard_task import write_shard_task

    monkeypatch.setattr("ckptflow.tasks.run.scale_preflight.MERGE_GAP", 0)  # planning's scale reads stay tiny
    # The shard task's retries wait 0.1 s instead of 1, 4 and 15 s (here one retry, 1 s saved): how long
    # Prefect waits is not what this test proves; that it runs the task again (run_count) and the bytes
    # come out exact is, whatever the delay. `with_options` (flows/passes.py) copies the task's delays.
    monkeypatch.setattr(write_shard_task, "retry_delay_seconds", [0.1, 0.1, 0.1])

    proxy, bucket, fs = faulty_s3["proxy"], faulty_s3["bucket"], faulty_s3["direct"]
    fs.put(str(demo_ckpt) + "/", f"{bucket}/src/", recursive=True)
    reference = tmp_path / "reference"
    dequant_reference(demo_ckpt, reference, tmp_path / "w0")

    # Six drops of one read: more than the HTTP stack retries (at most 4 attempts with s3fs's and
    # botocore's retries at 1), so the shard task fails and Prefect's retry has to finish it.
    proxy.add_rule(SameRequest(data_range_read), "drop", 6)
    state = convert_flow(f"s3://{bucket}/src", str(tmp_path / "out"), work=str(tmp_path / "w1"),
                         storage_options=faulty_s3["options"], return_state=True, dequant=True)
    summary = state.result()

    assert proxy.seen["drop"] == 6, proxy.seen
    assert summary["shards"] == 6 and summary["cached_shards"] == 0
    assert tree(tmp_path / "out") == tree(reference)
    counts = _task_run_counts(state.state_details.flow_run_id)
    assert len(counts) == 6 and sum(c - 1 for c in counts) >= 1, counts  # Prefect retried the shard


@pytest.mark.slow
def test_user_errors_are_not_retried(prefect_harness, faulty_s3, demo_ckpt, tmp_path, monkeypatch):
    """AccessDenied is the user's to fix: each shard task fails once, with no retry delay."""
    from ckptflow.flows.convert import convert_flow

    monkeypatch.setattr("ckptflow.tasks.run.scale_preflight.MERGE_GAP", 0)  # planning's scale reads stay tiny

    proxy, bucket, fs = faulty_s3["proxy"], faulty_s3["bucket"], faulty_s3["direct"]
    fs.put(str(demo_ckpt) + "/", f"{bucket}/src/", recursive=True)
    proxy.add_rule(data_range_read, "deny", 1000)
    t0 = time.perf_counter()
    state = convert_flow(f"s3://{bucket}/src", str(tmp_path / "out"), work=str(tmp_path / "w"),
                         storage_options=faulty_s3["options"], return_state=True, dequant=True)
    elapsed = time.perf_counter() - t0
    assert state.is_failed()
    counts = _task_run_counts(state.state_details.flow_run_id)
    assert counts and all(c == 1 for c in counts), counts
    assert proxy.seen["deny"] == len(counts), proxy.seen  # one denied read per task, none retried
    assert elapsed < 20, elapsed


def test_deployment_file_parameters_validate_against_their_flows():
    """Every deployment in deployments/prefect.yaml names a real flow and valid parameters."""
    import importlib

    import yaml

    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert doc["pull"] == []  # flow runs import the installed package; nothing is cloned
    names = set()
    for dep in doc["deployments"]:
        # A module path (no colon: Prefect reads `a:b` as a path into the deployment's storage).
        module, fn = dep["entrypoint"].rsplit(".", 1)
        assert module.startswith("ckptflow.flows.") and ":" not in dep["entrypoint"], dep["entrypoint"]
        flow = getattr(importlib.import_module(module), fn)
        flow.validate_parameters(dep["parameters"])
        assert dep["work_pool"]["name"] == "ckptflow-process"
        assert all(not s.get("active", True) for s in dep.get("schedules", []))
        names.add(flow.name)
    assert names == {"ckptflow-convert", "ckptflow-watch", "ckptflow-megatron"}


def test_deployed_parameter_schemas_have_no_runtime_yet_in_process_calls_pass_one():
    """`runtime` is the CLI's, in-process only: the schema `prefect deploy` stores for each flow
    (`parameter_schema(flow)`, Prefect's cli/deploy/_core.py: the UI's "Custom run" form and
    `prefect deployment inspect`) has no such property; validating a call still passes the
    CLI's `Runtime` through, the same object."""
    import importlib
    import inspect

    import yaml
    from prefect.utilities.callables import parameter_schema

    from ckptflow.flows.megatron_core import megatron_core_flow
    from ckptflow.flows.runtime.process import Runtime

    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    flows = [getattr(importlib.import_module(module), fn)
             for module, fn in (dep["entrypoint"].rsplit(".", 1) for dep in doc["deployments"])]
    for flow in [*flows, megatron_core_flow]:  # megatron-core: deployable too, though the yaml has none
        schema = parameter_schema(flow).model_dump()
        assert "source" in schema["properties"] or "source_prefix" in schema["properties"], flow.name
        assert "runtime" not in schema["properties"], (flow.name, schema["properties"]["runtime"])
        assert "runtime" in inspect.signature(flow.fn).parameters, flow.name
        runtime = Runtime()
        given = {name: "x" for name in schema["required"]}
        assert flow.validate_parameters({**given, "runtime": runtime})["runtime"] is runtime, flow.name
        assert flow.validate_parameters(given)["runtime"] is None, flow.name  # a deployment run's


# ------------------------------------------------------------------------------- observability


def _run_artifacts(flow_run_id) -> dict[str, object]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}


@pytest.mark.slow
def test_progress_artifact_advances_per_shard_and_summary_is_published(prefect_harness, demo_ckpt, tmp_path,
                                                                        monkeypatch, request):
    import logging

    import ckptflow.flows.report as report
    from ckptflow.flows.convert import convert_flow

    updates: list[tuple[float, str]] = []
    real_update = report.update_progress_artifact

    def spy(artifact_id, progress, description=None):
        updates.append((progress, description))
        return real_update(artifact_id, progress, description=description)

    monkeypatch.setattr(report, "update_progress_artifact", spy)
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    task_logger = logging.getLogger("prefect.task_runs")  # Prefect's task loggers do not propagate
    request.addfinalizer(lambda level=task_logger.level: task_logger.setLevel(level))
    task_logger.setLevel(logging.INFO)  # setLevel, not .level =: it also clears the enabled-for cache
    monkeypatch.setattr(task_logger, "handlers", [*task_logger.handlers, handler])
    out = tmp_path / "out"
    state = convert_flow(str(demo_ckpt), str(out), work=str(tmp_path / "w"), return_state=True, dequant=True)
    summary = state.result()

    # One update per committed shard, never going backwards, ending at 100 %.
    assert len(updates) == summary["shards"] == 6
    percents = [p for p, _ in updates]
    assert percents == sorted(percents) and 0 < percents[0] < 100 and percents[-1] == 100.0
    sizes = sorted(p.stat().st_size for p in out.glob("*.safetensors"))
    assert percents[0] >= round(100 * sizes[0] / summary["bytes_written"], 2) - 0.01
    assert updates[-1][1].startswith("6/6 shards committed")

    artifacts = _run_artifacts(state.state_details.flow_run_id)
    assert {"convert-progress", "convert-summary", "dtypes", "dtype-check"} <= set(artifacts)
    assert float(artifacts["convert-progress"].data) == 100.0
    assert "6 (0 cache hits)" in artifacts["convert-summary"].data
    data = artifacts["dtypes"].data
    rows = json.loads(data) if isinstance(data, str) else data
    assert {r["dtype"] for r in rows} == set(summary["dtypes"])

    # A structured line per shard, naming the file and its numbers.
    lines = [line for line in lines if line.startswith("shard committed")]
    committed = sorted(line.split(" file=")[1].split()[0] for line in lines)
    assert committed == sorted(p.name for p in out.glob("*.safetensors"))
    assert all("tensors=" in line and "gbps_in=" in line and "worker=" in line for line in lines)

    # A rerun finds every shard committed: the artifact reaches 100 % from cache alone.
    updates.clear()
    again = convert_flow(str(demo_ckpt), str(out), work=str(tmp_path / "w"), dequant=True)
    assert again["cached_shards"] == 6 and [p for p, _ in updates][-1] == 100.0 and len(updates) == 6


# ------------------------------------------------------------------ concurrency limits by tag


def _shard_task_runs(env: dict[str, str], dest: Path, since: float, flow_name_prefix: str = "dequant ") -> list[dict]:
    """Tags and running interval of the shard task runs of the convert flow run that wrote `dest`,
    started after `since` (a time.time()), read over the server's REST API here: a `get_client()`
    subprocess would import Prefect for each read. The run is found by its `dest` parameter, so
    other tests' runs on the same server never count."""
    import datetime

    after = datetime.datetime.fromtimestamp(since - 5, datetime.timezone.utc).isoformat()
    flow_runs = prefect_servers.rest(env["PREFECT_API_URL"] + "/flow_runs/filter", {
        "flow_runs": {"start_time": {"after_": after}}, "flows": {"name": {"any_": ["ckptflow-convert"]}}})
    ids = [r["id"] for r in flow_runs if r["parameters"].get("dest") == str(dest)]
    assert len(ids) == 1, [(r["name"], r["parameters"].get("dest")) for r in flow_runs]
    runs = prefect_servers.rest(env["PREFECT_API_URL"] + "/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
    stamp = lambda text: datetime.datetime.fromisoformat(text).timestamp()  # noqa: E731
    return [{"id": r["id"], "flow_run_id": r["flow_run_id"], "tags": r["tags"],
             "start": stamp(r["start_time"]), "end": stamp(r["end_time"])}
            for r in runs if r["name"].startswith(flow_name_prefix) and r["end_time"]]


def _overlaps(runs: list[dict]) -> int:
    spans = sorted((r["start"], r["end"]) for r in runs)
    return sum(1 for (_, end), (start, _) in zip(spans, spans[1:]) if start < end)


@pytest.fixture
def private_prefect_server():
    """A Prefect server of the test's own, started now and waited for by `.ready()`: a tag concurrency
    limit on `ckptflow-shard` is global, and on the shared server it would throttle every other test's
    shard tasks while it exists. A task that finds no free slot asks again after ~0.25 s, not the
    default 10 s: the limited run's tasks then follow each other closely (a shorter wait only makes
    overlap more likely, were the limit not kept). No deployments here: its scheduler stays off."""
    server = prefect_servers.PrivateServer(PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS="0.25",
                                           PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_tag_concurrency_limit_caps_shard_tasks_across_processes(threaded_output, faulty_s3,
                                                                   private_prefect_server, tmp_path):
    """`prefect concurrency-limit create ckptflow-shard 1` serialises shard tasks even on a
    2-process pool, where they otherwise overlap."""
    proxy, bucket = faulty_s3["proxy"], faulty_s3["bucket"]
    faulty_s3["direct"].put(str(threaded_output["source"]) + "/", f"{bucket}/src/", recursive=True)
    # Every data read waits, as on a slow store: a shard's few GETs (its small tensors side by side come
    # in one, storage/read_runs.py) then outlast its dealings with Prefect, even on a loaded machine.
    proxy.delay = 1.0
    proxy.add_rule(data_range_read, "delay", 100_000)
    options = json.dumps({k: v for k, v in faulty_s3["options"].items() if k != "skip_instance_cache"})

    def run(name: str, env: dict[str, str]) -> list[dict]:
        """The CLI's `main` in this process (no process importing torch and Prefect to start it: the
        processes that matter are the pool's two workers), against env's server."""
        since, out = time.time(), tmp_path / f"out-{name}"
        # The pool's workers send their task runs' events through this process's events worker, which
        # keeps the server it was made for: drained on the way in and out (`clients_on`), earlier flows'
        # events go to their server, this run's to `env`'s while it still answers.
        with prefect_servers.clients_on(env["PREFECT_API_URL"]):
            proc = run_main("convert", f"s3://{bucket}/src", str(out), "--dequant", "--work",
                            str(tmp_path / f"work-{name}"), "--storage-options", options,
                            "--task-runner", "processes", "--max-workers", "2", PREFECT_API_URL=env["PREFECT_API_URL"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs = _shard_task_runs(env, out, since)
        assert len(runs) == 6 and all("ckptflow-shard" in r["tags"] for r in runs), runs
        assert tree(out) == threaded_output["tree"]
        return runs

    # The free run goes to the shared server (no test sets a limit there) while the private one starts.
    assert _overlaps(run("free", threaded_output["env"])) >= 1
    env = {**threaded_output["env"], "PREFECT_API_URL": private_prefect_server.ready()}
    # What the README's `prefect concurrency-limit create ckptflow-shard 1` asks the server (Prefect's
    # own CLI: `client.create_concurrency_limit`), without a process that imports Prefect to say it.
    prefect_servers.rest(env["PREFECT_API_URL"] + "/concurrency_limits/", {"tag": "ckptflow-shard",
                                                                         "concurrency_limit": 1})
    assert _overlaps(run("limited", env)) == 0

"""deployments/prefect.yaml, deployed and run for real, from a user's own Prefect project.

A real `prefect server` on loopback, a process work pool, `prefect deploy` of the yaml from a
Prefect project folder that has its own `flows/` and `tasks/` packages (what every Prefect project
has), a `prefect worker` whose flow runs import the installed `ckptflow` package while that
project's `flows` is importable too, and runs triggered with `prefect deployment run --param …`
against a moto S3 bucket. Credentials and the endpoint reach the flow runs through the worker's
environment, as the yaml says they must; no parameter carries them.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from . import prefect_servers
from .helpers import PYTHON, ROOT, dequant_reference, kill_group, server_env
from .helpers import tree
from .helpers import s3_tree

# One xdist group: every test here runs on one worker (conftest fails them if xdist split the group), so
# the yaml is deployed once, on the session's shared server: `prefect deploy --all` of the yaml takes no
# other pool name and deployment names are global on a server, so two workers deploying it there would
# overwrite each other's deployments. No other test deploys anything or uses the `ckptflow-process`
# pool, so this module's process worker takes only this module's runs (the other tests' flow runs have
# no deployment, and a worker only takes runs of its pool's deployments).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect_deploy")]


def prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def users_prefect_project(dest: Path) -> Path:
    """A Prefect project of a user's: its own `flows/` and `tasks/` packages and flow. If ckptflow
    imported `flows.…` anywhere, it would get these."""
    for pkg in ("flows", "tasks"):
        (dest / pkg).mkdir(parents=True)
        (dest / pkg / "__init__.py").write_text("USERS_OWN = True\n")
    (dest / "flows" / "etl.py").write_text("from prefect import flow\n\n\n@flow\ndef etl():\n    return 1\n")
    return dest


def api(env: dict[str, str], path: str, body: dict | None = None, method: str | None = None) -> object:
    """The server's REST API in `env` (GET, or POST of `body`), read here: a `get_client()` in a
    subprocess would import Prefect (seconds of CPU) for every poll."""
    return prefect_servers.rest(env["PREFECT_API_URL"] + path, body, method)


def create_process_pool(env: dict[str, str], name: str) -> None:
    """What `prefect work-pool create NAME --type process` does, over REST (setup, not what a test is
    about: the CLI would cost a process start): the pool with the process worker's default job
    template. One a previous fixture of this session made is kept."""
    import urllib.error

    from prefect.workers.process import ProcessWorker

    try:
        api(env, "/work_pools/", {"name": name, "type": "process",
                                  "base_job_template": ProcessWorker.get_default_base_job_template()})
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: it exists
            raise


def flow_runs(env: dict[str, str], deployment: str) -> list[dict]:
    runs = api(env, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})
    return [{"name": r["name"], "state": r["state_type"], "parameters": r["parameters"],
             "auto_scheduled": r["auto_scheduled"]} for r in runs]


def scheduled_deployment(env: dict[str, str], base: Path, stop: threading.Event) -> dict:
    """A deployment of convert_flow with an interval schedule, made as `prefect deploy` made the yaml's
    (same flow, entrypoint, pool, parameter schema, no pull steps) but over REST, and a thread that
    records its flow runs until one completed (or `stop`), then deletes it: its schedule would go on
    making runs on the shared server.

    Made over REST, its first run can fall due a few seconds after the deployment exists, not after a
    `prefect deploy` process whose duration a loaded machine stretches. The server schedules a new
    deployment within ~6 s (its recent-deployments loop runs every 5 s) and a run due before that is
    never created: the first is due 12 s from now; on a machine so loaded that the scheduler is later,
    the next a minute later. A later run may start while the first still holds DEST's lock and fail
    (DestBusy): only a completed run counts."""
    import datetime
    import urllib.error

    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    base.mkdir()
    make_deepseek_v3_fp8(open_location(str(base / "fp8")))
    template = api(env, "/deployments/name/ckptflow-convert/convert-fp8-to-bf16")
    first_due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=12)
    made = api(env, "/deployments/", {
        "name": "scheduled-convert", "flow_id": template["flow_id"], "entrypoint": template["entrypoint"],
        "path": template["path"], "pull_steps": template["pull_steps"], "work_pool_name": "ckptflow-process",
        "parameter_openapi_schema": template["parameter_openapi_schema"], "enforce_parameter_schema": True,
        "parameters": {"source": str(base / "fp8"), "dest": str(base / "out"), "work": str(base / "work"),
                       "dequant": True},
        "schedules": [{"schedule": {"interval": 60, "anchor_date": (first_due - datetime.timedelta(seconds=60))
                                    .isoformat()}, "active": True}]})
    scheduled = {"out": base / "out", "runs": []}

    def watch() -> None:
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and not stop.wait(1):
                scheduled["runs"] = flow_runs(env, "scheduled-convert")
                if any(r["state"] == "COMPLETED" for r in scheduled["runs"]):
                    break
        finally:
            try:
                api(env, "/deployments/" + made["id"], method="DELETE")
            except urllib.error.URLError:  # a server already gone (the session ends) took it along
                pass

    scheduled["thread"] = threading.Thread(target=watch, name="scheduled-deployment", daemon=True)
    scheduled["thread"].start()
    return scheduled


@pytest.fixture(scope="module")
def deployed(prefect_server, s3_endpoint, tmp_path_factory):
    """The yaml deployed to the session's shared server, a bucket, and a process worker polling the
    pool while this module's tests run (it polls the server every 2 s: it does not outlive them).
    The shared server is a full one: its scheduler runs (the scheduled deployment), and so do the
    event and log distributors `--watch` streams. The worker, the import check and `prefect deploy`
    start together: each pays seconds of imports, on different cores."""
    import uuid

    import s3fs

    base = tmp_path_factory.mktemp("deploy")
    project = users_prefect_project(base / "project")
    bucket = "models-" + uuid.uuid4().hex[:8]
    env = server_env(prefect_server["home"], PREFECT_API_URL=prefect_server["url"],
                     AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=s3_endpoint, CKPTFLOW_WORK=str(base / "cache"),
                     # the worker asks for due runs every 2 s, not every 10 s: each run starts sooner
                     PREFECT_WORKER_QUERY_SECONDS="2")
    # The worker and its flow runs import ckptflow from this venv's installation; the project's own
    # `flows` and `tasks` are importable there too, as a worker serving that project would have them.
    env["PYTHONPATH"] = str(project)

    create_process_pool(env, "ckptflow-process")
    worker_dir = base / "worker"
    worker_dir.mkdir()
    log = open(worker_dir / "worker.log", "wb")
    worker = subprocess.Popen([PYTHON, "-m", "prefect", "worker", "start", "--pool", "ckptflow-process",
                               "--type", "process", "--prefetch-seconds", "5"], env=env,
                              cwd=worker_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Where the worker runs, the project's `flows`/`tasks` and ckptflow's import side by side.
        code = "import flows, tasks, ckptflow.flows.convert as c"  # a user's own package, on purpose
        code += "; print(flows.USERS_OWN, tasks.USERS_OWN, c.convert_flow.name)"
        both = subprocess.Popen([PYTHON, "-c", code], env=env, cwd=base, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # ckptflow's yaml, deployed from the user's project folder (README: `--prefect-file path/to/…`).
        dep = prefect(["--no-prompt", "deploy", "--prefect-file", str(ROOT / "deployments" / "prefect.yaml"),
                       "--all"], env, project)
        out, err = both.communicate(timeout=120)
        assert dep.returncode == 0, dep.stdout + dep.stderr
        assert out.split() == ["True", "True", "ckptflow-convert"], out + err

        stop = threading.Event()
        scheduled = scheduled_deployment(env, base / "scheduled", stop)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, key="testing", secret="testing",
                               client_kwargs={"endpoint_url": s3_endpoint})
        fs.mkdir(bucket)
        try:
            yield {"env": env, "base": base, "bucket": bucket, "fs": fs, "project": project,
                   "deploy_output": dep.stdout, "worker_log": worker_dir / "worker.log", "scheduled": scheduled}
        finally:
            stop.set()
            scheduled["thread"].join(60)
    finally:
        kill_group(worker, grace=2)  # its runs are over; a SIGTERMed worker takes seconds to wind down
        log.close()


def worker_log(deployed) -> str:
    return deployed["worker_log"].read_text(errors="replace")[-6000:]


def test_convert_deployment_runs_from_the_yaml_against_a_bucket(deployed, demo_ckpt, tmp_path):
    env, b, fs = deployed["env"], deployed["bucket"], deployed["fs"]
    fs.put(str(demo_ckpt) + "/", f"{b}/incoming/demo/", recursive=True)
    reference = tmp_path / "reference"
    dequant_reference(demo_ckpt, reference, tmp_path / "ref-work")

    run = prefect(["deployment", "run", "ckptflow-convert/convert-fp8-to-bf16",
                   "--param", f"source=s3://{b}/incoming/demo", "--param", f"dest=s3://{b}/converted/demo",
                   "--watch", "--watch-timeout", "300"], env, tmp_path, timeout=360)  # as the README writes it
    assert run.returncode == 0, run.stdout + run.stderr + worker_log(deployed)
    assert "Completed" in run.stdout, run.stdout + worker_log(deployed)
    assert s3_tree(fs, f"{b}/converted/demo") == tree(reference)
    # With no `work` parameter, shard records and the journal went to the bucket, beside DEST (a
    # RemoteFileSystem block): any worker reaches them.
    assert fs.find(f"{b}/converted/.ckptflow-work/demo/results")
    runs = flow_runs(env, "convert-fp8-to-bf16")
    assert [r["state"] for r in runs] == ["COMPLETED"]
    assert not any(k in json.dumps(runs[0]["parameters"]).lower() for k in ("secret", "testing"))


def test_an_invalid_deployment_parameter_is_rejected_before_a_run_exists(deployed, tmp_path):
    env = deployed["env"]
    before = len(flow_runs(env, "convert-fp8-to-bf16"))
    cases = [("mp=two", "mp"), ("task_runner=gpu-cluster", "task_runner"), ("max_shard_size=big", "max_shard_size")]
    # `prefect deployment run … --param P` for each case, in one process (`prefect` is `prefect.cli:app`):
    # each exit code and output as three processes would give them, for one import of Prefect, not three.
    code = """import contextlib, io, json, sys
from prefect.cli import app
for param in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sys.argv = ["prefect", "deployment", "run", "ckptflow-convert/convert-fp8-to-bf16", "--param", param]
        try:
            app()  # reads sys.argv, as the `prefect` script does
            code = 0
        except SystemExit as exc:
            code = exc.code
    print(json.dumps({"code": code, "out": out.getvalue()}))
"""
    runs = subprocess.run([PYTHON, "-c", code, *(param for param, _ in cases)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    results = [json.loads(line) for line in runs.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), runs.stdout + runs.stderr
    for run, (_, field) in zip(results, cases):
        assert run["code"] not in (0, None), run["out"]
        assert re.search(rf"\b{field}\b", run["out"]), run["out"]
    assert len(flow_runs(env, "convert-fp8-to-bf16")) == before


def test_watch_deployment_converts_what_is_missing_under_the_prefix(deployed, demo_ckpt, tmp_path):
    env, b, fs = deployed["env"], deployed["bucket"], deployed["fs"]
    for name in ("one", "two"):
        fs.put(str(demo_ckpt) + "/", f"{b}/watched/{name}/", recursive=True)
    args = ["deployment", "run", "ckptflow-watch/watch-incoming", "--param", f"source_prefix=s3://{b}/watched",
            "--param", f"dest_prefix=s3://{b}/watched-bf16", "--param", "settle_seconds=0",
            "--watch", "--watch-timeout", "300"]
    run = prefect(args, env, tmp_path, timeout=360)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr + worker_log(deployed)
    one = s3_tree(fs, f"{b}/watched-bf16/one")
    assert one and one == s3_tree(fs, f"{b}/watched-bf16/two")
    assert json.loads(one["config.json"])["torch_dtype"] == "bfloat16"
    markers = sorted(p.rsplit("/", 2)[-2] for p in fs.find(f"{b}/watched-bf16/.ckptflow-work")
                     if p.endswith("/watch.json"))
    assert markers == ["one", "two"]


def test_a_scheduled_deployment_fires_and_its_run_completes(deployed):
    """The server's scheduler creates a flow run from an interval schedule and the worker runs it to
    Completed. With SQLAlchemy 2.1 every scheduler tick failed ("Can't evaluate bulk DML statement")
    and no scheduled run was ever created; pyproject pins sqlalchemy<2.1. The deployment was made with
    the module's fixture (`scheduled_deployment`): its run falls due and runs while the other tests run."""
    scheduled = deployed["scheduled"]
    scheduled["thread"].join(360)
    runs = scheduled["runs"]
    done = [r for r in runs if r["state"] == "COMPLETED"]
    assert done, f"no scheduled run completed: {runs}\n" + worker_log(deployed)
    assert done[0]["auto_scheduled"], done[0]  # made by the scheduler, not by `deployment run`
    assert json.loads((scheduled["out"] / "config.json").read_text())["torch_dtype"] == "bfloat16"


def deployment(env: dict[str, str], name: str) -> dict:
    d = api(env, "/deployments/name/" + name)
    return {"parameters": d["parameters"],
            "schedules": [{"cron": s["schedule"].get("cron"), "active": s["active"]} for s in d["schedules"]]}


def test_an_operator_points_the_watch_deployment_at_their_buckets_without_editing_the_yaml(deployed):
    """README: `prefect deploy … --name watch-incoming --param source_prefix=… --param dest_prefix=…
    --cron …` sets the buckets and an active schedule; the yaml is not edited."""
    env, b = deployed["env"], deployed["bucket"]
    yaml_before = (ROOT / "deployments" / "prefect.yaml").read_bytes()
    dep = prefect(["--no-prompt", "deploy", "--prefect-file", str(ROOT / "deployments" / "prefect.yaml"),
                   "--name", "watch-incoming", "--param", f"source_prefix=s3://{b}/uploads",
                   "--param", f"dest_prefix=s3://{b}/served", "--cron", "30 3 * * *"], env, deployed["project"])
    assert dep.returncode == 0, dep.stdout + dep.stderr
    got = deployment(env, "ckptflow-watch/watch-incoming")
    assert got["parameters"]["source_prefix"] == f"s3://{b}/uploads"
    assert got["parameters"]["dest_prefix"] == f"s3://{b}/served"
    assert got["parameters"]["options"]["dequant"] is True  # the yaml's other parameters are kept
    assert {"cron": "30 3 * * *", "active": True} in got["schedules"], got
    assert (ROOT / "deployments" / "prefect.yaml").read_bytes() == yaml_before

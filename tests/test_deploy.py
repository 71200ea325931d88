"""deployments/prefect.yaml, deployed and run for real.

A real `prefect server` on loopback, a process work pool, `prefect deploy` of the yaml from a git
repository holding this working tree, a `prefect worker` whose flow runs clone that repository
(the yaml's pull steps), and runs triggered with `prefect deployment run --param …` against a
moto S3 bucket. Credentials and the endpoint reach the flow runs through the worker's
environment, as the yaml says they must; no parameter carries them.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, ROOT, kill_group, server_env
from .test_flow import tree
from .test_watch import s3_tree

pytestmark = pytest.mark.slow


def prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def git_repo_of_working_tree(dest: Path) -> Path:
    """A git repository (branch main, one commit) of this working tree as it is now, committed
    or not: what the worker's pull step clones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=ckptflow-test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def flow_runs(env: dict[str, str], deployment: str) -> list[dict]:
    code = ("import asyncio, json, sys\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(\n"
            "            name=DeploymentFilterName(any_=[sys.argv[1]])))\n"
            "        print(json.dumps([{'name': r.name, 'state': r.state_type.value, 'parameters': r.parameters}\n"
            "                          for r in runs]))\n"
            "asyncio.run(main())\n")
    proc = subprocess.run([PYTHON, "-c", code, deployment], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def deployed(prefect_server, s3_endpoint, tmp_path_factory):
    """The yaml deployed to the server, a process worker polling its pool, and a bucket."""
    import uuid

    import s3fs

    base = tmp_path_factory.mktemp("deploy")
    repo = git_repo_of_working_tree(base / "repo")
    bucket = "models-" + uuid.uuid4().hex[:8]
    env = server_env(prefect_server["home"], PREFECT_API_URL=prefect_server["url"], CKPTFLOW_REPO=str(repo),
                     AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=s3_endpoint, CKPTFLOW_WORK=str(base / "cache"))
    env.pop("PYTHONPATH", None)  # flow runs import ckptflow from their clone, not from this checkout

    pool = prefect(["work-pool", "create", "ckptflow-process", "--type", "process", "--overwrite"], env, base)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    dep = prefect(["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env, repo)
    assert dep.returncode == 0, dep.stdout + dep.stderr

    worker_dir = base / "worker"
    worker_dir.mkdir()
    log = open(base / "worker.log", "wb")
    worker = subprocess.Popen([PYTHON, "-m", "prefect", "worker", "start", "--pool", "ckptflow-process",
                               "--type", "process", "--prefetch-seconds", "5"],
                              env=env, cwd=worker_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, key="testing", secret="testing",
                           client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(bucket)
    try:
        yield {"env": env, "base": base, "bucket": bucket, "fs": fs, "repo": repo, "deploy_output": dep.stdout}
    finally:
        kill_group(worker)
        log.close()


def worker_log(deployed) -> str:
    return (deployed["base"] / "worker.log").read_text(errors="replace")[-6000:]


def test_convert_deployment_runs_from_the_yaml_against_a_bucket(prefect_harness, deployed, demo_ckpt, tmp_path):
    from flows.convert import convert_flow

    env, b, fs = deployed["env"], deployed["bucket"], deployed["fs"]
    fs.put(str(demo_ckpt) + "/", f"{b}/incoming/demo/", recursive=True)
    reference = tmp_path / "reference"
    convert_flow(str(demo_ckpt), str(reference), work=str(tmp_path / "ref-work"))  # in-process, local

    run = prefect(["deployment", "run", "ckptflow-convert/convert-fp8-to-bf16",
                   "--param", f"source=s3://{b}/incoming/demo", "--param", f"dest=s3://{b}/converted/demo",
                   "--param", f"work=s3://{b}/ckptflow-work/demo", "--param", "max_workers=2",
                   "--watch", "--watch-timeout", "300"], env, tmp_path, timeout=360)
    assert run.returncode == 0, run.stdout + run.stderr + worker_log(deployed)
    assert "Completed" in run.stdout, run.stdout + worker_log(deployed)
    assert s3_tree(fs, f"{b}/converted/demo") == tree(reference)
    # Shard records went to the bucket work location (a RemoteFileSystem block): any worker reaches them.
    assert fs.find(f"{b}/ckptflow-work/demo/results")
    runs = flow_runs(env, "convert-fp8-to-bf16")
    assert [r["state"] for r in runs] == ["COMPLETED"]
    assert not any(k in json.dumps(runs[0]["parameters"]).lower() for k in ("secret", "testing"))


def test_an_invalid_deployment_parameter_is_rejected_before_a_run_exists(deployed, tmp_path):
    env = deployed["env"]
    before = len(flow_runs(env, "convert-fp8-to-bf16"))
    for param, field in [("mp=two", "mp"), ("task_runner=gpu-cluster", "task_runner"), ("max_shard_size=big", "max_shard_size")]:
        run = prefect(["deployment", "run", "ckptflow-convert/convert-fp8-to-bf16", "--param", param], env, tmp_path,
                      timeout=120)
        assert run.returncode != 0, run.stdout
        assert re.search(rf"\b{field}\b", run.stdout + run.stderr), run.stdout + run.stderr
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
    markers = sorted(p.rsplit("/", 2)[-2] for p in fs.find(f"{b}/watched-bf16/.ckptflow-work") if p.endswith("/watch.json"))
    assert markers == ["one", "two"]

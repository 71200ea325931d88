"""Which Prefect server a CLI run uses (flows/runtime/server.py): its own temporary one, gone when it
leaves, or the local server `ckptflow server start` keeps running (flows/runtime/persistent_server.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

from . import prefect_servers
from .helpers import PYTHON, ROOT, cli_env, seed_prefect_home, tree


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _flow_run_names(url: str) -> list[str]:
    request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [run["name"] for run in json.loads(response.read())]


def _runs_writing(url: str, dest, since: float, field: str = "name") -> list[str]:
    """The names (or another `field`) of the flow runs started since `since` (epoch seconds) with
    parameter `dest`: the session's server is shared with every other test, and a test's DEST is its own."""
    import datetime

    after = datetime.datetime.fromtimestamp(since - 1, datetime.timezone.utc).isoformat()
    runs = prefect_servers.rest(f"{url}/flow_runs/filter",
                                {"flow_runs": {"start_time": {"after_": after}}, "sort": "START_TIME_DESC"})
    return [run[field] for run in runs if run["parameters"].get("dest") == str(dest)]


def _convert_json(src, tmp_path, env: dict[str, str]) -> dict:
    """`convert SRC tmp/out --dequant --json` through the CLI; its summary."""
    run = _cli("convert", str(src), str(tmp_path / "out"), "--dequant", "--work", str(tmp_path / "w"), "--json",
               env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return {**json.loads(run.stdout), "text": run.stderr}  # --json: the summary's text is on stderr


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_local_server_start_status_stop_and_runs_use_it(demo_ckpt, tmp_path):
    env = cli_env(temporary_server=True, CKPTFLOW_SERVER_HOME=str(tmp_path / "srv"))
    seed_prefect_home(tmp_path / "srv" / "prefect")  # where the server keeps its database: no migration
    assert _cli("server", "status", env=env).returncode == 1  # none yet

    started = _cli("server", "start", env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    state = json.loads((tmp_path / "srv" / "server.json").read_text())
    url, pid = state["url"], state["pid"]
    assert url in started.stdout and url.startswith("http://127.0.0.1:")
    ui = url.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as response:  # what its UI calls
        assert json.loads(response.read())["api_url"] == url  # not Prefect's default port 4200
    again = _cli("server", "start", env=env)  # a second start finds it, starts nothing
    assert again.returncode == 0 and url in again.stdout
    assert json.loads((tmp_path / "srv" / "server.json").read_text())["pid"] == pid
    status = _cli("server", "status", env=env)
    assert status.returncode == 0 and url in status.stdout and str(pid) in status.stdout

    try:
        summary = _convert_json(demo_ckpt, tmp_path, env)
        assert summary["timing"]["server"] == "local"
        assert "local server" in summary["text"]
        assert re.search(rf"^run: +{re.escape(ui)}/runs/flow-run/[0-9a-f-]{{36}}$", summary["text"], re.M)
        assert len(_flow_run_names(url)) >= 1  # the run is recorded there, browsable in its UI
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    finally:
        stopped = _cli("server", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _wait_closed(_port(url), 20)
    assert _cli("server", "status", env=env).returncode == 1
    assert "no local Prefect server was running" in _cli("server", "stop", env=env).stdout


@pytest.mark.slow
def test_temporary_server_serves_one_run_and_is_gone_after_it(demo_ckpt, tmp_path):
    env = cli_env(temporary_server=True, CKPTFLOW_SERVER_HOME=str(tmp_path / "no-local-server"))
    summary = _convert_json(demo_ckpt, tmp_path, env)
    assert summary["timing"]["server"] == "temporary"
    assert "temporary server" in summary["text"]
    assert "/runs/flow-run/" not in summary["text"]  # its UI dies with the run: no link to print
    assert _wait_closed(_port(summary["timing"]["server_url"]), 15)
    assert tree(tmp_path / "out")  # the run itself is whole


# The `ckptflow` script (console_main), with two witnesses of how its process ends: an atexit handler
# registered before Prefect's (so it runs after every one of them), and an object that only the
# interpreter's final clean-up frees.
WITNESSED_CLI = """
import atexit, sys
class Witness:
    def __del__(self, write=sys.stderr.write):  # bound now: the clean-up may have emptied `sys` by then
        write("witness: freed at finalization\\n")
witness = Witness()
atexit.register(lambda: sys.stderr.write("witness: last atexit handler ran\\n"))
from ckptflow.flows.cli import console_main
sys.argv = ["ckptflow", *sys.argv[1:]]
sys.exit(console_main())
"""


@pytest.mark.slow
def test_a_run_with_prefect_api_url_starts_no_server_and_records_there(demo_ckpt, tmp_path):
    """The first rule of flows/runtime/server.py, which the suite's CLI tests rely on (helpers.cli_env): a
    URL in the environment is used as is; no temporary server is started, nothing waits for one.

    On that server, which outlives the run, the CLI leaves after Prefect's exit teardown (its last
    log line reaches the server) but before the interpreter frees every object (~1 CPU-s, seconds
    of wall on a busy machine: flows/runtime/interrupt.py `leave`)."""
    env = cli_env()
    url = env["PREFECT_API_URL"]
    since = time.time()
    run = subprocess.run([PYTHON, "-c", WITNESSED_CLI, "convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant",
                          "--work", str(tmp_path / "w"), "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = {**json.loads(run.stdout), "text": run.stderr}
    assert (summary["timing"]["server"], summary["timing"]["server_url"]) == ("yours", None)
    assert "your server" in summary["text"] and "temporary server" not in summary["text"]
    (flow_run,) = _runs_writing(url, tmp_path / "out", since, "id")  # this run, recorded on that server
    assert run.stderr.rstrip().endswith("witness: last atexit handler ran"), run.stderr[-2000:]
    assert "witness: freed at finalization" not in run.stderr
    logs = prefect_servers.rest(f"{url}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run]}}})
    # the flow's last line, logged as it ended: only the teardown's drain sends it
    assert any(log["message"].startswith("Finished in state Completed") for log in logs), \
        [log["message"] for log in logs]


@pytest.mark.slow
def test_a_server_named_in_prefect_toml_wins_in_the_same_process(demo_ckpt, tmp_path):
    """No URL in the environment or the profile, but ./prefect.toml names a server: the temporary
    server started early is stopped and Prefect's settings are read again in the same process
    (no re-executed CLI), so the run is recorded on the server the user named."""
    url = prefect_servers.api_url()
    project = tmp_path / "project"
    project.mkdir()
    (project / "prefect.toml").write_text(f'[api]\nurl = "{url}"\n')
    env = cli_env(temporary_server=True, CKPTFLOW_SERVER_HOME=str(tmp_path / "no-local-server"))
    since = time.time()
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "convert", str(demo_ckpt), str(tmp_path / "out"),
                          "--dequant", "--work", str(tmp_path / "w"), "--json"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert (summary["timing"]["server"], summary["timing"]["server_url"]) == ("yours", None)
    assert len(_runs_writing(url, tmp_path / "out", since)) == 1  # this run, recorded where prefect.toml said
    assert tree(tmp_path / "out")


def _wait_closed(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _listening(port)


@pytest.mark.slow
def test_a_stale_local_server_record_is_ignored(demo_ckpt, tmp_path):
    """server.json naming a server that died: runs fall back to a temporary server; status says none."""
    home = tmp_path / "srv"
    home.mkdir()
    (home / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": os.getpid()}))
    env = cli_env(temporary_server=True, CKPTFLOW_SERVER_HOME=str(home))
    assert _cli("server", "status", env=env).returncode == 1
    assert _convert_json(demo_ckpt, tmp_path, env)["timing"]["server"] == "temporary"
    # stop must not signal a PID that is not the server it started (here: this test process)
    assert "no local Prefect server was running" in _cli("server", "stop", env=env).stdout

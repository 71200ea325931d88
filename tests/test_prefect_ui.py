"""What Prefect's UI shows of a CLI run without `-v`: the flow's and every shard task's logs in the
API, task runs named after the files they write, and the run's page printed by the CLI; the
terminal shows none of Prefect's run logs."""
from __future__ import annotations

import io
import logging
import re
import subprocess
import time
from typing import Any
from uuid import UUID

import pytest

from .helpers import PYTHON, ROOT, server_env


def _records(api: str, flow_run_id: UUID) -> tuple[list[Any], dict[str, list[Any]]]:
    """(the flow run's own log records, {task run name: its log records}), read through Prefect's client."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
                                                LogFilterTaskRunId)

    with SyncPrefectClient(api) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow_logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        task_logs = {t.name: client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[t.id])))
                     for t in task_runs}
    return [r for r in flow_logs if r.task_run_id is None], task_logs


@pytest.mark.slow
def test_a_quiet_cli_run_logs_to_the_api_names_task_runs_after_files_and_prints_its_page(
        prefect_server, demo_ckpt, tmp_path):
    api = prefect_server["url"]
    env = server_env(prefect_server["home"], PREFECT_API_URL=api)  # PREFECT_LOGGING_LEVEL=WARNING, no -v
    out = tmp_path / "out"
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "convert", str(demo_ckpt), str(out), "--dequant",
                          "--work", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    page = re.search(re.escape(api.removesuffix("/api")) + r"/runs/flow-run/([0-9a-f-]{36})", run.stderr)
    assert page, run.stderr
    flow_run_id = UUID(page.group(1))
    # The terminal stays as quiet as before: Prefect's run records went to the API only.
    assert "shard committed" not in run.stdout + run.stderr and "Finished in state" not in run.stdout + run.stderr

    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 6
    deadline = time.monotonic() + 20  # the CLI flushed its logs at exit; the server may still be writing them
    while True:
        flow_logs, task_logs = _records(api, flow_run_id)
        complete = (any(r.message.startswith("converted 6 shard(s)") for r in flow_logs)
                    and all(any("shard committed" in r.message for r in logs) for logs in task_logs.values()))
        if complete or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(task_logs) == [f"dequant {name}" for name in files]
    assert any(r.message.startswith("Beginning flow run") and r.level == logging.INFO for r in flow_logs)
    assert any(r.message.startswith("converted 6 shard(s)") for r in flow_logs), [r.message for r in flow_logs]
    for name in files:
        committed = [r for r in task_logs[f"dequant {name}"] if r.message.startswith("shard committed")]
        assert len(committed) == 1 and f"file={name} " in committed[0].message, task_logs[f"dequant {name}"]
        assert committed[0].level == logging.INFO and committed[0].flow_run_id == flow_run_id


def test_quiet_console_drops_run_records_and_keeps_the_rest():
    """The console handler of a CLI run without `-v` (flows/cli/console_log.py): a run's INFO..ERROR
    (Prefect's traceback of a failed run included) stay off the terminal; a library's warning and
    a run's CRITICAL are shown."""
    from ckptflow.flows.cli.console_log import QuietRunsConsoleHandler

    stream = io.StringIO()
    handler = QuietRunsConsoleHandler(stream=stream)
    for name, level, message in [("prefect.flow_runs", logging.INFO, "flow info"),
                                 ("prefect.flow_runs", logging.ERROR, "flow failed"),
                                 ("prefect.task_runs", logging.WARNING, "task warning"),
                                 ("prefect.task_runs", logging.CRITICAL, "task critical"),
                                 ("prefect.flow_runs_lookalike", logging.WARNING, "lookalike warning"),
                                 ("fsspec", logging.WARNING, "library warning")]:
        handler.handle(logging.LogRecord(name, level, __file__, 1, message, None, None))
    shown = stream.getvalue()
    assert "flow info" not in shown and "flow failed" not in shown and "task warning" not in shown
    assert "task critical" in shown and "lookalike warning" in shown and "library warning" in shown

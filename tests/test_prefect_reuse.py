"""What Prefect shows of a rerun, against the session's shared test server (tests/prefect_servers.py):
each shard the journal reused is a task run named after its file, in a Completed state named
"Cached"; the CLI's runtime is recorded as a placeholder, never sent to the server."""
from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import pytest


def _task_runs(flow_run_id: UUID, expect: int) -> list[Any]:
    """The flow run's task runs, once `expect` of them are recorded (task runs that the engine ran
    reach the server as events, a moment after the flow returned)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if len(runs) >= expect or time.monotonic() > deadline:
            return runs
        time.sleep(0.3)


@pytest.mark.slow
def test_reused_shards_are_cached_task_runs_named_after_their_files(prefect_harness, demo_ckpt, tmp_path):
    from prefect.client.orchestration import get_client

    from ckptflow.flows.convert import convert_flow
    from ckptflow.flows.runtime.process import Runtime

    out, work = tmp_path / "out", tmp_path / "work"
    first = convert_flow(str(demo_ckpt), str(out), work=str(work), dequant=True, return_state=True)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 2 and first.result()["cached_shards"] == 0
    runtime = Runtime()
    # One file is damaged: the rerun writes it again; every other one is reused.
    (out / files[0]).write_bytes(b"damaged")
    again = convert_flow(str(demo_ckpt), str(out), work=str(work), dequant=True, runtime=runtime,
                         return_state=True)
    summary = again.result()
    assert summary["cached_shards"] == len(files) - 1

    runs = _task_runs(again.state_details.flow_run_id, len(files))
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted(f"dequant {name}" for name in files), sorted(by_name)
    written = by_name.pop(f"dequant {files[0]}")
    assert written.state_type.value == "COMPLETED" and written.state_name == "Completed"
    for name, run in by_name.items():
        assert run.state_type.value == "COMPLETED" and run.state_name == "Cached", (name, run.state_name)
        assert "reused" in run.state.message and name.split(" ", 1)[1] in run.state.message
    # Same task as the written shards (the UI groups them), and counted once each.
    assert {r.task_key for r in runs} == {written.task_key} and len(runs) == len(files)

    # The runtime (server handle, plan, sinks) stayed in this process: Prefect stored a placeholder.
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(again.state_details.flow_run_id)
    assert flow_run.parameters["runtime"] == "<Runtime>"
    # ... and the conversion counted on its own sink in that runtime.
    assert runtime.counts() == (len(files), len(files))

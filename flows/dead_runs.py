"""Flow runs whose process died: a run that takes over DEST's lock from a dead run marks that
run Crashed in Prefect, so a SIGKILLed CLI (or a lost machine) does not leave a run "Running"
forever. The lock record names the flow run (`owner_record`)."""
from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

log = logging.getLogger("ckptflow.flows")


def owner_record() -> dict[str, object] | None:
    """What DEST's lock records of this run besides host and pid: its flow run id, in a flow."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    return {"flow_run_id": str(run.id)} if run is not None else None


def mark_crashed(holder: dict[str, Any]) -> None:
    """`dest_lock`'s takeover hook: the dead holder's flow run, if still not final, becomes Crashed."""
    run_id = holder.get("flow_run_id")
    try:
        uuid = UUID(str(run_id))
    except ValueError:
        return  # a lock written by a run outside Prefect, or by an older ckptflow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid)
        if run.state is None or run.state.is_final():
            return
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        client.set_flow_run_state(uuid, Crashed(message=f"its process ({who}) died; a later run took over "
                                                        "DEST's lock and resumes from its committed shards"),
                                  force=True)
    log.warning("flow run %s (%s) had died while writing this DEST; marked it Crashed", run_id, who)

"""The Prefect UI page of a CLI run, printed as the run starts.

Only where a server outlives the run: the user's (`PREFECT_API_URL`, a profile) or the local one
`ckptflow server start` keeps running (flows/runtime/persistent_server.py). ckptflow's temporary server dies
with the run and serves no UI, so a link to it would lead nowhere. Printed at the start, not in
the summary, so a run that fails or is interrupted has its link too.
"""
from __future__ import annotations

import sys
from typing import Any, TypeVar

from ckptflow.flows.runtime.server import Server

F = TypeVar("F")


def outlives_run(server: Server) -> bool:
    """Does this run's Prefect server keep its records (and UI) after this process leaves?"""
    if server.kind == "temporary":
        return False
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)  # None: Prefect's in-process ephemeral server


def flow_run_url(flow_run_id: Any) -> str | None:
    """The UI page of a flow run on the configured server (Prefect's own mapping: Cloud, /api)."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id)


def announce(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow's `on_running` hook: one `run:` line on stderr (stdout may be `--json`'s one
    document), above the progress bars."""
    url = flow_run_url(flow_run.id)
    if url:
        from tqdm import tqdm

        tqdm.write(f"run:      {url}", file=sys.stderr)  # clears and redraws bars on the terminal
        sys.stderr.flush()


def linked(flow: F, server: Server) -> F:
    """`flow` announcing its run's UI page when it starts, if the run's server outlives it."""
    return flow.with_options(on_running=[announce]) if outlives_run(server) else flow  # type: ignore[attr-defined]

"""What a flow adds to a pass: fetching a remote source first, and shard tasks on Prefect.

The pass itself (prepare, shards with journal reuse, finalize, verify) is the engine's
(`ckptflow.tasks.run.passes`, `ckptflow.tasks.run.engine`); here is how a flow submits its shard
work: one Prefect task per output shard, named after the file it writes, on the flow run's task
runner (threads, processes, Dask).
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.futures import as_completed, wait

from ckptflow.storage.files import list_files
from ckptflow.storage.urls import Location, open_location
from ckptflow.tasks.fetch import fetch_file, plan_fetch, read_markers, source_listing
from ckptflow.tasks.run.shard_task import write_shard_task
from ckptflow.tasks.run.submit import ShardCall

from ckptflow.flows.printable import printable
from ckptflow.flows.workdir import result_storage


def fetch_source(src: Location, work: str, storage_options: dict[str, Any] | None) -> Location:
    """Copy the source into `<work>/source`, skipping files fetched and verified before."""
    dst = open_location(f"{work.rstrip('/')}/source", storage_options)
    names = list(list_files(src))
    listing = source_listing(src, names)
    local = list_files(dst) if dst.fs.exists(dst.root) else {}
    todo = plan_fetch(listing, read_markers(dst, names, local), local)
    futures = [fetch_file.submit(src.url, dst.url, n, listing[n], storage_options) for n in todo]
    wait(futures)
    for f in futures:
        f.result()
    get_run_logger().info("fetched %d file(s), %d already present", len(todo), len(names) - len(todo))
    return dst


class PrefectSubmitter:
    """Shard calls as Prefect tasks on the current flow run's task runner; their small JSON
    records persist under `<work>/results` (a location every worker of the run reaches)."""

    def __init__(self, work: str, storage_options: dict[str, Any] | None) -> None:
        self._storage = result_storage(work, storage_options)

    def submit(self, call: ShardCall) -> Any:
        # The task run is named after the file it writes, as the UI lists it (a template: braces doubled).
        run_name = f"{call.stage} {printable(call.shard.file)}".replace("{", "{{").replace("}", "}}")
        task = write_shard_task.with_options(name=f"{call.stage}-shard", task_run_name=run_name,
                                             result_storage=self._storage, refresh_cache=True)
        return task.submit(*call.args())

    def as_completed(self, futures: list[Any]) -> Any:
        return as_completed(futures)

    def note_reused(self, stage: str, reused: list[tuple[str, dict[str, Any]]]) -> None:
        """Each shard the journal proved committed (by an earlier run) shows in the flow run as a
        task run of the shard task, named after its file like a written one, in a Completed state
        named "Cached". It is created in that final state (one API call, no task engine): nothing
        runs, and Prefect's cache is not consulted; the journal decided (`tasks/run/journal.py`).
        Best effort: a run whose server refuses these still converts (its log lists the reuse)."""
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext, TagsContext
        from prefect.states import Completed

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return
        task = write_shard_task.with_options(name=f"{stage}-shard")
        try:
            with get_client(sync_client=True) as client:
                for file, record in reused:
                    client.create_task_run(
                        task, ctx.flow_run.id, dynamic_key=f"reused {stage} {file}", name=f"{stage} {printable(file)}",
                        extra_tags=TagsContext.get().current_tags,
                        state=Completed(name="Cached", message=(
                            f"reused: the commit journal proves {printable(file)} is the file an earlier run "
                            f"committed ({record.get('tensors', '?')} tensors, {record.get('size', '?')} bytes); "
                            "not read, not rewritten")))
        except Exception as exc:  # noqa: BLE001 - what Prefect shows must never fail a conversion
            get_run_logger().warning("could not record the %d reused shard(s) as task runs: %s", len(reused), exc)

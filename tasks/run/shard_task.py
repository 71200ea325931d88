"""The Prefect task every stage runs per output shard: `run_shard` (plan in, small JSON record
out) on whatever task runner the flow run has.

The commit journal is the one record of what is done (`ckptflow.tasks.run.journal`): the task
keeps no Prefect cache (NO_CACHE), so a rerun never trusts a record it cannot check against the
file. Its record is persisted as a result (`<work>/results`) only so a run's artifacts and the UI
show it.
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ckptflow.storage.transient import TRANSIENT_RETRIES
from ckptflow.tasks.plan.model import ShardPlan
from ckptflow.tasks.run.shard import run_shard
from ckptflow.tasks.run.worker_errors import names_the_worker


@task(name="write-shard", cache_policy=NO_CACHE, persist_result=True, result_serializer="json",
      cache_result_in_memory=False, **TRANSIENT_RETRIES)
@names_the_worker  # an error on a Dask worker says which worker
def write_shard_task(stage: str, shard: ShardPlan, source: str, dest: str,
                     fingerprints: list[tuple[str, int, str | None]],
                     storage_options: dict[str, Any] | None = None, digest: bool = False,
                     device: str = "cpu", backend: str = "auto", journal: str | None = None) -> dict[str, Any]:
    """`run_shard` as a Prefect task (see there)."""
    return run_shard(stage, shard, source, dest, fingerprints, storage_options, digest, device, backend, journal)

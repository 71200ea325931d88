"""The Prefect task every stage runs per output shard: `run_shard` (plan in, small JSON record
out) on whatever task runner the flow run has.

The commit journal is the one record of what is done (`ckptflow.tasks.run.journal`): Prefect's
cache never decides reuse. The task's cache policy only names its persisted record
(`<work>/results/<key>`, the journal entry's key, so the UI and the record show which shard it
is); every submission refreshes it (`refresh_cache=True`), so a record is written, never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from ckptflow.storage.transient import TRANSIENT_RETRIES
from ckptflow.tasks.plan.model import ShardPlan
from ckptflow.tasks.run.resume import shard_key
from ckptflow.tasks.run.shard import run_shard
from ckptflow.tasks.run.worker_errors import names_the_worker


@dataclass
class RecordKey(CachePolicy):
    """The persisted record's name: the shard's journal key (what determines its bytes)."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return shard_key(inputs["stage"], inputs["shard"], inputs["fingerprints"], inputs["dest"])


@task(name="write-shard", cache_policy=RecordKey(), persist_result=True, result_serializer="json",
      cache_result_in_memory=False, **TRANSIENT_RETRIES)
@names_the_worker  # an error on a Dask worker says which worker
def write_shard_task(stage: str, shard: ShardPlan, source: str, dest: str,
                     fingerprints: list[tuple[str, int, str | None]],
                     storage_options: dict[str, Any] | None = None, digest: bool = False,
                     device: str = "cpu", backend: str = "auto", journal: str | None = None) -> dict[str, Any]:
    """`run_shard` as a Prefect task (see there)."""
    return run_shard(stage, shard, source, dest, fingerprints, storage_options, digest, device, backend, journal)

"""Resume across flow runs: a cache policy keyed on what determines a shard's bytes.

Prefect's DEFAULT policy includes RUN_ID, so it only hits inside one flow run, and TASK_SOURCE
sees the task function but not the helpers and kernels it calls. This key is instead:
stage + the shard plan's digest + fingerprints (name, size, etag/mtime) of the source files it
reads + the destination URL + a code version bumped whenever output bytes could change.
Tasks without a shard plan (the Megatron import) put what determines their output in `params`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

# Bump when a change to planners, transforms or the writer could change any output byte.
CODE_VERSION = "ckptflow-shards-1"


def shard_key(stage: str, shard: Any, fingerprints: list, dest: str, params: Any = None) -> str:
    """What determines one task's output; the Prefect cache key and the commit journal's name.
    Raises when it cannot be hashed: a None key would disable caching and give every shard the
    same journal entry."""
    return hash_objects(CODE_VERSION, stage, shard.digest() if shard is not None else None,
                        params, sorted(map(tuple, fingerprints)), dest, raise_on_failure=True)


@dataclass
class ShardCachePolicy(CachePolicy):
    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return shard_key(inputs["stage"], inputs.get("shard"), inputs["fingerprints"], inputs["dest"],
                         inputs.get("params"))


SHARD_CACHE = ShardCachePolicy()

"""The key of one output shard: what determines its bytes, and the name of its journal entry.

stage + the shard plan's digest + fingerprints (name, size, etag/mtime) of the source files it
reads + the destination URL + a code version bumped whenever output bytes could change. Tasks
without a shard plan (the Megatron import) put what determines their output in `params`.
Pure (no Prefect): the engine computes it without any orchestrator.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when a change to planners, transforms or the writer could change any output byte.
CODE_VERSION = "ckptflow-shards-2"


def shard_key(stage: str, shard: Any, fingerprints: list, dest: str, params: Any = None) -> str:
    """A hex digest of what determines one shard's output. Fingerprints may come back from a task
    runner as lists instead of tuples: JSON spells both alike. Raises when something in it has no
    JSON form: a key made of `repr`s could name two different shards alike."""
    parts = [CODE_VERSION, stage, shard.digest() if shard is not None else None, params,
             sorted(map(list, fingerprints)), dest]
    try:
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Unable to create hash of a shard key ({exc})") from None
    return hashlib.sha256(text.encode()).hexdigest()[:32]

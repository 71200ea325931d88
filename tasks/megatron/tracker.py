"""Megatron's `latest_checkpointed_iteration.txt`: its name and the bounds its contents must keep.

A module of its own (no torch) so that finding a Megatron-Core save's iteration folder, which
`inspect` and `megatron --dry-run` do first, does not import torch with the GPT-2 loader."""
from __future__ import annotations

TRACKER = "latest_checkpointed_iteration.txt"
TRACKER_CAP = 64          # it holds "release" or an iteration number; read no more than this
MAX_ITERATION = 10**12    # Megatron writes iter_%07d; a trillion steps is past any real run

"""Plan plain size-bounded sharding, as Hugging Face's `save_pretrained` does.

Tensors keep their order; a new shard starts when the next tensor would push the current one
past `max_shard_size` (a tensor bigger than the limit gets a shard of its own). One shard is
called `model.safetensors` and gets no index; more are `model-0000k-of-0000N.safetensors`.
"""
from __future__ import annotations

from ckptflow.storage.checkpoint import Checkpoint

from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef, StagePlan


def plan_size_shards(ckpt: Checkpoint, max_shard_size: int, stage: str = "shard") -> StagePlan:
    tensors = [OutputTensor(name, info.dtype, tuple(info.shape), "copy", (SourceRef.of(file, info),))
               for file in sorted(ckpt.headers) for name, info in ckpt.headers[file].tensors.items()]
    return size_shards(tensors, max_shard_size, stage)


def size_shards(tensors: list[OutputTensor], max_shard_size: int, stage: str = "shard",
                **plan_fields: object) -> StagePlan:
    """`tensors`, in order, into shards of at most `max_shard_size` (`plan_fields`: StagePlan's others)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.spec.nbytes
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    groups = [g for g in groups if g]
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    return StagePlan(stage, tuple(ShardPlan(f, tuple(g)) for f, g in zip(names, groups)),  # type: ignore[arg-type]
                     write_index=n > 1, **plan_fields)

"""Plans are pure data: what every output shard holds and where each byte comes from.

A stage's planner turns a `Checkpoint` (headers, index, config) into a `StagePlan` without
reading a tensor. The executor then writes one `ShardPlan` per task. Plans are frozen
dataclasses of strings and ints, so they hash stably into cache keys and pickle to Dask workers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ckptflow.storage.errors import UserError
from ckptflow.storage.safetensors_format import TensorInfo, TensorSpec
from ckptflow.tasks.plan.transforms import read_bytes


class PlanError(UserError, ValueError):
    """The checkpoint cannot be converted as asked; the message names the tensor and the fix."""


@dataclass(frozen=True)
class SourceRef:
    """A source tensor: its file, name, dtype, shape and absolute byte range."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @classmethod
    def of(cls, file: str, info: TensorInfo) -> "SourceRef":
        return cls(file, info.name, info.dtype, tuple(info.shape), info.start, info.end)


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: how to make it (`transform`) from which sources, with which params."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    transform: str                      # a name in `tasks.plan.transforms.REGISTRY`
    sources: tuple[SourceRef, ...]
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[OutputTensor, ...]

    @property
    def specs(self) -> list[TensorSpec]:
        return [t.spec for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)

    @cached_property
    def source_bytes(self) -> int:
        """Source bytes this shard's transforms read: an MP rank's cut of a tensor costs its slice
        (or the scale blocks around it), not the whole tensor (`transforms.read_bytes`). Computed
        once per plan object (dry runs and shard tasks ask more than once)."""
        return sum(read_bytes(t) for t in self.tensors)

    @property
    def source_files(self) -> list[str]:
        return sorted({s.file for t in self.tensors for s in t.sources})

    def digest(self) -> str:
        """A stable hash of everything that determines this shard's bytes (every field of every
        tensor and source, in order). Built from plain lists, not `asdict` (which deep-copies
        each of 500k tensors: ~20x slower), and computed once per plan object: the flow, the
        cache policy and the task each ask for it."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        rows = [[t.name, t.dtype, t.shape, t.transform, [[s.file, s.name, s.dtype, s.shape, s.start, s.end]
                                                         for s in t.sources], t.params] for t in self.tensors]
        blob = json.dumps([self.file, rows], separators=(",", ":"), default=list)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StagePlan:
    stage: str
    shards: tuple[ShardPlan, ...]
    config: dict[str, Any] | None = None          # config.json to write, None = copy as is
    dropped: tuple[str, ...] = ()                 # source tensors consumed, not copied
    warnings: tuple[str, ...] = field(default=())
    write_index: bool = True                      # False: a layout without an index (MP files)
    copy_files: tuple[str, ...] | None = None     # globs of non-weight files to copy; None = all
    dropped_unmatched: tuple[str, ...] = ()       # of `dropped`: no MP preset row matched (--drop-unmatched)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.tensors}

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def source_bytes(self) -> int:
        return sum(s.source_bytes for s in self.shards)

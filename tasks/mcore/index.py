"""The index both Megatron-Core readers produce: global tensors made of byte-range chunks.

A torch_dist checkpoint states this directly (`.metadata`: global shape, each chunk's offsets and
sizes, its file and byte range); a legacy `mp_rank_*` checkpoint is turned into the same picture
from each rank's local tensors and Megatron's parallel layout. Keys are torch_dist's: layer
parameters stacked on a leading layer axis (`decoder.layers.self_attention.linear_qkv.weight` is
[L, ...]), experts on a second axis ([L, E, ...]), SwiGLU `linear_fc1` as [all gate rows; all up
rows]. So the mapping to Hugging Face names is written once, for this index, whatever the format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ChunkRef:
    """One C-contiguous block of a global tensor, stored as raw bytes at a known place."""

    file: str  # relative to the checkpoint folder: "__0_0.distcp", "mp_rank_01/model_optim_rng.pt"
    byte_offset: int  # absolute offset of the chunk's first element in that file
    byte_length: int  # == prod(sizes) * itemsize
    offsets: tuple[int, ...]  # where the chunk starts in the global tensor, per dim
    sizes: tuple[int, ...]  # the chunk's shape


@dataclass(frozen=True)
class GlobalTensor:
    key: str
    dtype: str  # safetensors dtype name: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]  # tile the tensor exactly: no gap, no overlap (readers check)


@dataclass(frozen=True)
class McoreIndex:
    root: str  # URL of the iteration folder that holds the checkpoint
    format: Literal["torch_dist", "legacy"]
    iteration: int | None  # None for a `release` folder
    args: dict[str, Any]  # the saved training arguments, plain values only ({} if none were saved)
    tp: int
    pp: int
    ep: int
    tensors: dict[str, GlobalTensor] = field(default_factory=dict)

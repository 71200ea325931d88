"""Every transform an output tensor can name, each registered once. Pure: no numpy, no torch.

`OutputTensor.transform` is a key of `REGISTRY`. Whatever needs to know what a transform does
asks its entry instead of comparing names:
- `action`: what reports call it (the dry run, the run's summary): dequantized, cast, sliced or
  copied — a copy into another file than its source's is "moved" (`action_of`);
- `cuts_itself`: given a `cut` (a composed MP slice, `tasks.plan.compose`), it reads and computes
  only what the cut needs; any other transform makes its whole output and the executor keeps the
  slice (`tasks.run.cuts.cut_stream`);
- `reads`: the source bytes it reads, what dry runs and runs report (`read_bytes`);
- `stream`: "module:function" of the executor's per-tensor function, imported on first use
  (`stream_of`), so planning never imports torch and the executor's modules need not import
  each other.

A name is part of every plan digest and resume key: never rename one. A new quantized format
is its kernel, its stream function, one `register` here and its scheme rule
(`tasks.planners.quant_scheme`).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from ckptflow.tasks.plan.regions import BlockRegion, Cut, cut_of

if TYPE_CHECKING:  # only for hints: the plan model imports this module
    from ckptflow.tasks.plan.model import OutputTensor


class Action:
    """What reports call each kind of work; `ORDER` is the order they list them in."""

    DEQUANTIZED, CAST, SLICED, MOVED, COPIED = "dequantized", "cast", "sliced", "moved", "copied"
    QUANTIZED, SCALES = "quantized", "scales"  # --quantize: the weights, and the scale tensors made beside them
    ORDER = (DEQUANTIZED, QUANTIZED, SCALES, CAST, SLICED, MOVED, COPIED)


Stream = Callable[[Any, Any], Iterator[Any]]  # (OutputTensor, execute.ExecContext) → pieces


def whole_sources(t: OutputTensor) -> int:
    """Every source read whole: what a transform that computes its whole output costs."""
    return sum(s.end - s.start for s in t.sources)


def _first_source_cut(t: OutputTensor, cut: Cut | None) -> int:
    """The first source costs only its `cut` (dim, start, stop); the others are read whole."""
    total = whole_sources(t)
    if cut is None or not t.sources:
        return total
    src, (dim, start, stop) = t.sources[0], cut
    whole = src.end - src.start
    return total - whole + whole // src.shape[dim] * (stop - start)


def cut_of_source(t: OutputTensor) -> int:
    """Element-wise transforms (copy, cast): a cut of the output is the same cut of the source."""
    return _first_source_cut(t, cut_of(t))


def own_slice(t: OutputTensor) -> int:
    """`slice`: its own (dim, start, stop) of the source."""
    return _first_source_cut(t, (int(t.param("dim")), int(t.param("start")), int(t.param("stop"))))


def block_region(t: OutputTensor) -> int:
    """Block-wise dequant: the whole scale blocks around a cut (`regions.BlockRegion`)."""
    cut = cut_of(t)
    if cut is None or not t.sources:
        return whole_sources(t)
    src = t.sources[0]
    n = 1
    for d in src.shape:
        n *= d
    region = BlockRegion.of(src.shape, tuple(t.param("block")), cut)
    kept = len(region.mats) * (region.rows[1] - region.rows[0]) * (region.cols[1] - region.cols[0])
    whole = src.end - src.start
    return whole_sources(t) - whole + whole // max(n, 1) * kept


@dataclass(frozen=True)
class Transform:
    name: str                                   # OutputTensor.transform: in plan digests, never renamed
    action: str                                 # an Action (COPIED: moved or copied, `action_of`)
    stream: str                                 # "module:function" the executor streams the tensor with
    cuts_itself: bool = False                   # computes only a `cut`'s part (else: whole, then cut)
    reads: Callable[[OutputTensor], int] = whole_sources  # source bytes read; matches `cuts_itself`

    @property
    def dequantizes(self) -> bool:
        return self.action == Action.DEQUANTIZED


REGISTRY: dict[str, Transform] = {}


def register(entry: Transform) -> Transform:
    if entry.name in REGISTRY:
        raise ValueError(f"transform {entry.name!r} is registered twice")
    if entry.action not in Action.ORDER or entry.action == Action.MOVED:  # "moved" is a copy's, by file
        raise ValueError(f"transform {entry.name!r}: action {entry.action!r} must be dequantized, cast, "
                         "sliced or copied")
    REGISTRY[entry.name] = entry
    return entry


_RUN = "ckptflow.tasks.run.execute"
_QUANT = "ckptflow.tasks.run.quant_stream"

COPY = register(Transform("copy", Action.COPIED, f"{_RUN}:copy_stream", cuts_itself=True, reads=cut_of_source))
CAST = register(Transform("cast", Action.CAST, f"{_RUN}:cast_stream", cuts_itself=True, reads=cut_of_source))
# A slice is itself a cut (params dim, start, stop); compose never cuts one again.
SLICE = register(Transform("slice", Action.SLICED, f"{_RUN}:slice_stream", reads=own_slice))
DEQUANT_FP8 = register(Transform("dequant_fp8", Action.DEQUANTIZED, f"{_RUN}:dequant_fp8_stream", cuts_itself=True,
                                 reads=block_region))
FP8_SCALED = register(Transform("fp8_scaled", Action.DEQUANTIZED, f"{_QUANT}:fp8_scaled_stream"))
NVFP4 = register(Transform("nvfp4", Action.DEQUANTIZED, f"{_QUANT}:nvfp4_stream"))
MXFP4_GPT_OSS = register(Transform("mxfp4_gpt_oss", Action.DEQUANTIZED, f"{_QUANT}:mxfp4_gpt_oss_stream"))
CT_MXFP4 = register(Transform("ct_mxfp4", Action.DEQUANTIZED, f"{_QUANT}:ct_mxfp4_stream"))

# --quantize (tasks.planners.quantize): the weight's stream computes codes and scales together and
# leaves the scales for the `quant_scale` tensor that follows it in the same shard; `quant_amax`
# is the first read of NVFP4 (amax per weight, into the work location), `quant_const` writes the
# fused group's global scale the planner computed from those amaxes.
_QW = "ckptflow.tasks.run.quant_write"
QUANT_WEIGHT = register(Transform("quant_weight", Action.QUANTIZED, f"{_QW}:quant_weight_stream"))
QUANT_SCALE = register(Transform("quant_scale", Action.SCALES, f"{_QW}:quant_scale_stream", reads=lambda t: 0))
QUANT_CONST = register(Transform("quant_const", Action.SCALES, f"{_QW}:quant_const_stream", reads=lambda t: 0))
QUANT_AMAX = register(Transform("quant_amax", Action.SCALES, f"{_QW}:quant_amax_stream"))


def _mcore_reads(t: OutputTensor) -> int:
    from ckptflow.tasks.mcore.hf_regions import region_read_bytes  # pure; imported late (it imports the plan model)

    return region_read_bytes(t)


# A Megatron-Core HF tensor: a region of a global tensor assembled from chunk byte ranges (tasks.mcore).
MCORE_REGION = register(Transform("mcore_region", Action.SLICED, "ckptflow.tasks.mcore.hf_stream:region_stream",
                                  reads=_mcore_reads))


def transform_of(t: OutputTensor) -> Transform:
    """`t`'s registry entry; a name not registered is a planner's bug, named with the tensor."""
    entry = REGISTRY.get(t.transform)
    if entry is None:
        raise ValueError(f"tensor {t.name!r} has unknown transform {t.transform!r}; "
                         f"registered: {', '.join(sorted(REGISTRY))}")
    return entry


def read_bytes(t: OutputTensor) -> int:
    """Bytes of its sources `t`'s transform reads: every source whole, except where the transform
    makes a cut itself (the slice for copy, cast and slice; the whole blocks around it for a
    block-wise dequant). What runs and dry runs report as read."""
    entry = REGISTRY.get(t.transform)
    return whole_sources(t) if entry is None else entry.reads(t)


def action_of(t: OutputTensor, shard_file: str) -> str:
    """What reports call the work making `t` in `shard_file` (an unregistered name counts as itself)."""
    entry = REGISTRY.get(t.transform)
    if entry is None:
        return t.transform
    if entry.action == Action.COPIED and not (len(t.sources) == 1 and t.sources[0].file == shard_file):
        return Action.MOVED
    return entry.action


@cache
def stream_of(name: str) -> Stream:
    """The executor's function for transform `name`, imported on first use."""
    module, _, func = REGISTRY[name].stream.partition(":")
    return getattr(importlib.import_module(module), func)

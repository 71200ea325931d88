"""Chaining stages: a plan's output as a checkpoint, and fusing copy-only stages into one pass.

`planned_checkpoint` describes what a plan will write (headers from its specs) so the next
stage can be planned — and its errors raised — before any byte is written. `compose` folds a
downstream plan of copies and slices (reindex, MP) into the upstream plan, so dequant + reindex
and dequant (+ fix-dtypes) + MP are each a single read-transform-write pass.
"""
from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Any

from ckptflow.storage.checkpoint import QUANT_CONFIG_NAME, Checkpoint
from ckptflow.storage.files import INDEX_NAME
from ckptflow.storage.safetensors_format import SHARD_METADATA, Header, TensorInfo, build_header

from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, StagePlan
from ckptflow.tasks.plan.transforms import COPY, SLICE, transform_of


def planned_checkpoint(plan: StagePlan, url: str, source: Checkpoint) -> Checkpoint:
    """The checkpoint `plan` will produce, as headers only (offsets exactly as the writer lays them)."""
    headers: dict[str, Header] = {}
    files: dict[str, int] = {}
    for shard in plan.shards:
        specs = shard.specs
        data_start = len(build_header(specs, SHARD_METADATA))
        tensors, offset = {}, data_start
        for spec in specs:
            tensors[spec.name] = TensorInfo(spec.name, spec.dtype, spec.shape, offset, offset + spec.nbytes)
            offset += spec.nbytes
        headers[shard.file] = Header(shard.file, offset, data_start, tensors, dict(SHARD_METADATA))
        files[shard.file] = offset
    config = plan.config if plan.config is not None else source.config
    for name in source.other_files():
        files.setdefault(name, 0)
    index = None
    if plan.write_index:
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        files[INDEX_NAME] = 0
    return Checkpoint(url, files, headers, {}, index, config, {f: None for f in headers},
                      source.quant_config if keeps_quant_config(plan) else None)


def keeps_quant_config(plan: StagePlan) -> bool:
    """Does `plan` carry hf_quant_config.json over (dequant leaves it out)?"""
    return plan.copy_files is None or any(fnmatch.fnmatch(QUANT_CONFIG_NAME, g) for g in plan.copy_files)


def _through(made: OutputTensor, t: OutputTensor) -> OutputTensor | None:
    """Downstream tensor `t` (a copy or slice of upstream output `made`) made straight from the
    upstream sources, or None when it cannot be (a slice of an already cut tensor)."""
    down, up = transform_of(t), transform_of(made)
    if down is COPY:
        return replace(made, name=t.name)
    if down is not SLICE or up is SLICE or made.param("cut") is not None:
        return None
    cut = (t.param("dim"), t.param("start"), t.param("stop"))
    if up is COPY:  # a slice of a copy is the plain slice of the source
        return replace(t, sources=made.sources)
    return replace(made, name=t.name, shape=t.shape,
                   params=made.params + (("cut", cut), ("full_shape", made.shape)))


def compose(upstream: StagePlan, downstream: StagePlan) -> StagePlan | None:
    """One plan doing both, when every downstream tensor is a copy or slice of one upstream output.

    A slice of a transformed tensor keeps the transform and gains a `cut` param, which the
    executor honours by computing only what the slice needs where the transform's registry entry
    `cuts_itself`, else by cutting its whole output (`ckptflow.tasks.run.cuts`). Returns
    None when that does not hold: the stages then run as two passes through the work location.
    """
    made: dict[str, OutputTensor] = {t.name: t for s in upstream.shards for t in s.tensors}
    shards = []
    for shard in downstream.shards:
        tensors = []
        for t in shard.tensors:
            if len(t.sources) != 1 or t.sources[0].name not in made:
                return None
            fused = _through(made[t.sources[0].name], t)
            if fused is None:
                return None
            tensors.append(fused)
        shards.append(ShardPlan(shard.file, tuple(tensors)))
    merged: dict[str, Any] = {
        "stage": f"{upstream.stage}+{downstream.stage}", "shards": tuple(shards),
        "config": downstream.config if downstream.config is not None else upstream.config,
        "dropped": upstream.dropped + downstream.dropped,
        "warnings": upstream.warnings + downstream.warnings,
        "dropped_unmatched": upstream.dropped_unmatched + downstream.dropped_unmatched,
        "write_index": downstream.write_index,
        # a file the upstream stage leaves out (dequant: hf_quant_config.json) stays out
        "copy_files": downstream.copy_files if downstream.copy_files is not None else upstream.copy_files,
    }
    return StagePlan(**merged)

"""Plan quantized → BF16: every quantized weight the declared scheme describes becomes BF16.

The scheme (FP8 block, compressed-tensors FP8 / NVFP4 / MXFP4, gpt-oss MXFP4, ModelOpt FP8 / NVFP4) and
each weight's scales and geometry come from `quant_layout.detect`. Output shards keep their source
names and tensor order; scales are folded in, activation / KV scales dropped (both listed);
config.json loses `quantization_config` wherever it sits and keeps its dtype key's spelling.
"""
from __future__ import annotations

import copy
import glob
from typing import Any

from ckptflow.storage.checkpoint import QUANT_CONFIG_NAME, Checkpoint

from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, SourceRef, StagePlan
from ckptflow.tasks.planners.quant_layout import detect, is_packed
from ckptflow.tasks.planners.quant_scheme import claims_unquantized

DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes the first, 5 the second
SCALE_SUFFIX = "_scale_inv"  # FP8 block scales; the MP planner keeps them beside their weights


def block_size_from_config(config: dict[str, Any] | None) -> tuple[int, int]:
    """The FP8 block of a DeepSeek-style config (MP slices must not cut a scale block)."""
    q = (config or {}).get("quantization_config") or {}
    block = q.get("weight_block_size") or [128, 128]
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise PlanError(f"config.json: quantization_config.weight_block_size must be two positive "
                        f"integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequant_config(config: dict[str, Any] | None, out_dtype: str = "bfloat16",
                   keep_quantization: bool = False) -> dict[str, Any] | None:
    """config.json for the output: dtype set under the key(s) the source uses (`torch_dtype` when
    it has none), `quantization_config` removed at the top and under `text_config`."""
    if config is None:
        return None
    out = copy.deepcopy(config)
    for holder in (out, out.get("text_config")):
        if not isinstance(holder, dict):
            continue
        if not keep_quantization:
            holder.pop("quantization_config", None)
        keys = [k for k in DTYPE_KEYS if k in holder] or (["torch_dtype"] if holder is out else [])
        for key in keys:
            holder[key] = out_dtype
    return out


def refuse_packed_leftovers(plan: StagePlan, config: dict[str, Any] | None, where: str) -> None:
    """A config without `quantization_config` over codes or packed tensors is a lie a loader
    believes: transformers would load the codes as weights. Refuse to write it."""
    if config is None or not claims_unquantized(config):
        return
    left = [(s.file, t.name, t.dtype) for s in plan.shards for t in s.tensors if is_packed(t.name, t.dtype)]
    if left:
        raise PlanError(f"{where}: config.json would claim an unquantized model while {len(left)} tensor(s) "
                        "are still quantized or packed; nothing more is written:\n"
                        + "\n".join(f"  - {f}: tensor {n!r} is {d}" for f, n, d in left[:50]))


def plan_dequant(ckpt: Checkpoint, *, allow_missing_scale: bool = False, allow_nonfinite: bool = False) -> StagePlan:
    """One output shard per source shard; raises `PlanError` listing every unconvertible tensor.
    `allow_nonfinite`: each dequantized tensor carries it (`finite_guard.ALLOW`), so bad scales are
    written through and counted rather than refused; it is part of the plan, so of the cache key:
    a shard written with it is never reused by a run without it."""
    layout = detect(ckpt, allow_missing_scale)
    if layout.problems:
        scheme = layout.scheme
        head = f"{scheme.method} ({scheme.where}): " if scheme else ""
        raise PlanError(f"{head}{len(layout.problems)} tensor(s) cannot be dequantized; nothing was written:\n"
                        + "\n".join(f"  - {p}" for p in layout.problems[:200]))
    skip = layout.consumed | set(layout.activations)
    shards: list[ShardPlan] = []
    names: dict[str, str] = {}
    for file in sorted(ckpt.headers):
        out: list[OutputTensor] = []
        for name, info in ckpt.headers[file].tensors.items():
            if name in skip:
                continue
            q = layout.quantized.get(name)
            if q is None:
                t = OutputTensor(name, info.dtype, tuple(info.shape), "copy", (SourceRef.of(file, info),))
            else:
                sources = (SourceRef.of(*q.main), *[SourceRef.of(f, i) for f, i in q.aux])
                params = q.params + ((("allow_nonfinite", True),) if allow_nonfinite else ())
                t = OutputTensor(q.out_name, "BF16", q.out_shape, q.transform, sources, params)
            if t.name in names:
                raise PlanError(f"{file}: output tensor {t.name!r} would be written twice (also from "
                                f"{names[t.name]}); the checkpoint holds both a packed and a plain copy")
            names[t.name] = file
            out.append(t)
        if out:
            shards.append(ShardPlan(file, tuple(out)))
    warnings = [f"{n}: no scale found, kept as FP8" for n in layout.kept]
    if layout.activations:
        acts = sorted(layout.activations)
        warnings.append(f"dropped {len(acts)} activation/KV-cache scale tensor(s), meaningless in a BF16 model: "
                        + ", ".join(acts[:20]) + (", …" if len(acts) > 20 else ""))
    keep = bool(layout.kept)
    copy_files = None
    if QUANT_CONFIG_NAME in ckpt.files and not keep:  # ModelOpt's description of what is now BF16
        copy_files = tuple(glob.escape(n) for n in ckpt.other_files() if n != QUANT_CONFIG_NAME)
    plan = StagePlan("dequant", tuple(shards), dequant_config(ckpt.config, keep_quantization=keep),
                     tuple(sorted(skip)), tuple(warnings), copy_files=copy_files)
    refuse_packed_leftovers(plan, plan.config, ckpt.url)
    return plan

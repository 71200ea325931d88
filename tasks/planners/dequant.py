"""Plan FP8 → BF16: every FP8 weight with its `<name>_scale_inv` (from any shard) becomes BF16.

Output shards keep their source names and tensor order; scales are consumed and dropped from
the index; config.json loses `quantization_config` and says `torch_dtype: bfloat16`.
"""
from __future__ import annotations

import copy
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import FP8_DTYPES

from ckptflow.tasks.kernels.scale_grid import normalise_scale
from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, SourceRef, StagePlan

SCALE_SUFFIX = "_scale_inv"
SUPPORTED_SCALE_DTYPES = {"F32"}


def block_size_from_config(config: dict[str, Any] | None) -> tuple[int, int]:
    q = (config or {}).get("quantization_config") or {}
    block = q.get("weight_block_size") or [128, 128]
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise PlanError(f"config.json: quantization_config.weight_block_size must be two positive "
                        f"integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequant_config(config: dict[str, Any] | None, out_dtype: str = "bfloat16",
                   keep_quantization: bool = False) -> dict[str, Any] | None:
    if config is None:
        return None
    out = copy.deepcopy(config)
    if not keep_quantization:
        out.pop("quantization_config", None)
    out["torch_dtype"] = out_dtype
    return out


def plan_dequant(ckpt: Checkpoint, *, allow_missing_scale: bool = False) -> StagePlan:
    """One output shard per source shard; raises `PlanError` listing every unconvertible tensor."""
    block = block_size_from_config(ckpt.config)
    tensors = ckpt.tensors()
    weight_map = ckpt.weight_map()
    scales_used: set[str] = set()
    problems: list[str] = []
    passed_through: list[str] = []
    shards: list[ShardPlan] = []
    for file in sorted(ckpt.headers):
        out: list[OutputTensor] = []
        for name, info in ckpt.headers[file].tensors.items():
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors \
                    and tensors[name[: -len(SCALE_SUFFIX)]][1].dtype in FP8_DTYPES:
                continue  # consumed by its weight
            src = SourceRef.of(file, info)
            if info.dtype not in FP8_DTYPES:
                out.append(OutputTensor(name, info.dtype, src.shape, "copy", (src,)))
                continue
            scale_name = name + SCALE_SUFFIX
            if scale_name not in tensors:
                where = weight_map.get(scale_name)
                if allow_missing_scale:
                    passed_through.append(name)
                    out.append(OutputTensor(name, info.dtype, src.shape, "copy", (src,)))
                    continue
                problems.append(f"{file}: tensor {name!r} is {info.dtype} but its scale "
                                f"{scale_name!r} is not in the checkpoint"
                                + (f" (the index says {where}, which lacks it)" if where else "")
                                + "; pass --allow-missing-scale to keep it as FP8")
                continue
            scale_file, scale_info = tensors[scale_name]
            if scale_info.dtype not in SUPPORTED_SCALE_DTYPES:
                problems.append(f"{scale_file}: tensor {scale_name!r} is {scale_info.dtype}; "
                                "scales must be F32")
                continue
            try:
                normalise_scale(tuple(info.shape), tuple(scale_info.shape), block, name)
            except ValueError as exc:
                problems.append(f"{file}: {exc}")
                continue
            scales_used.add(scale_name)
            out.append(OutputTensor(name, "BF16", src.shape, "dequant_fp8",
                                    (src, SourceRef.of(scale_file, scale_info)),
                                    (("block", block),)))
        if out:
            shards.append(ShardPlan(file, tuple(out)))
    if problems:
        raise PlanError(f"{len(problems)} tensor(s) cannot be dequantized:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    warnings = tuple(f"{n}: no scale found, kept as FP8" for n in passed_through)
    return StagePlan("dequant", tuple(shards),
                     dequant_config(ckpt.config, keep_quantization=bool(passed_through)),
                     tuple(sorted(scales_used)), warnings)

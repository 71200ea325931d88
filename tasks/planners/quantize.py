"""Plan `--quantize`: BF16/F16/F32 Linear weights → FP8-block, FP8-channel, NVFP4 or MXFP4, laid out
as llm-compressor's `model_free_ptq` writes them (compressed-tensors names, dtypes, shapes, config).

Layout: the reindex planner's (`plan_reindex`), so every fused group (q/k/v, gate/up of each
dense MLP, routed and shared expert, MLA q_a + kv_a, w1/w3) lands in one output file, and
`--max-shard-size` bounds the files, whether or not `--reindex` was asked for.

Chains: planned on the *planned* output of an upstream plan (`--dequant`, `--fix-dtypes`); each
quantized weight then names its upstream tensor (transform, dtype, shape, params) as `inner`, and
the executor streams that tensor's values through the upstream transform straight into the
quantizer: `--dequant --quantize nvfp4` reads each source byte once per pass.

NVFP4 needs each fused group's amax before a member is written: `plan_amax` is a first pass
(one small F32 file of per-weight amaxes per output shard, in the work location, journaled like
any shard, so a resume reuses it) and `with_global_scales` fills the write plan from it.
"""
from __future__ import annotations

import copy
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.tasks.plan.compose import planned_checkpoint
from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, StagePlan
from ckptflow.tasks.plan.transforms import QUANT_AMAX, QUANT_CONST, QUANT_SCALE, QUANT_WEIGHT
from ckptflow.tasks.planners.quant_targets import QuantScheme, ignore_matcher, is_target, listed_in_ignore
from ckptflow.tasks.planners.reindex import DEFAULT_MAX_SHARD_SIZE, group_of, load_fused_groups, plan_reindex
from ckptflow.tasks.presets.fused_groups import FusedGroup

CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout and config this writes
AMAX_STAGE = "quantize-amax"


def _inner(t: OutputTensor) -> tuple[str, str, tuple[int, ...], tuple]:
    """What the quantizer reads: the upstream transform, its output dtype, shape and params."""
    return (t.transform, t.dtype, t.shape, t.params)


def quant_config(scheme: QuantScheme, ignore: list[str]) -> dict[str, Any]:
    """quantization_config as llm-compressor 0.14's model_free_ptq writes it (compressed-tensors 0.19)."""
    return {"config_groups": {scheme.preset: copy.deepcopy(scheme.config_group)}, "format": scheme.format,
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "transform_config": {}, "version": CT_VERSION}


def is_quantized(ckpt: Checkpoint) -> bool:
    """Does the checkpoint declare a quantization (config.json or hf_quant_config.json)?"""
    config = ckpt.config or {}
    held = [c for c in (config, config.get("text_config")) if isinstance(c, dict) and c.get("quantization_config")]
    return bool(held or ckpt.quant_config)


def _refuse_quantized(ckpt: Checkpoint) -> None:
    if is_quantized(ckpt):
        raise PlanError(f"{ckpt.url}: the checkpoint is already quantized (config.json has a "
                        "quantization_config); add --dequant to quantize it again from BF16")


def plan_quantize(ckpt: Checkpoint, scheme: QuantScheme, *, rounding: str = "fp32",
                  ignore: tuple[str, ...] | None = None, upstream: StagePlan | None = None,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                  groups: list[FusedGroup] | None = None) -> tuple[StagePlan | None, StagePlan]:
    """(amax plan or None, write plan). The write plan of NVFP4 carries `global_scale` None until
    `with_global_scales` fills it from the amax pass."""
    groups = load_fused_groups(None) if groups is None else groups
    source = planned_checkpoint(upstream, ckpt.url, ckpt) if upstream is not None else ckpt
    if upstream is None:
        _refuse_quantized(ckpt)
    matcher = ignore_matcher(ignore)
    made = {t.name: t for s in upstream.shards for t in s.tensors} if upstream is not None else {}
    layout = plan_reindex(source, max_shard_size, groups)
    # a lone model.safetensors keeps its name; an index is written always, as llm-compressor does
    if len(layout.shards) == 1 and len(source.headers) == 1:
        layout = StagePlan(layout.stage, (ShardPlan(next(iter(source.headers)), layout.shards[0].tensors),),
                           warnings=layout.warnings)
    shards, amax_shards, misfits, skipped = [], [], [], []
    for k, shard in enumerate(layout.shards, start=1):
        out: list[OutputTensor] = []
        amax: list[OutputTensor] = []
        for t in shard.tensors:
            base = made.get(t.name, t)  # no upstream: the reindex copy reads the source itself
            if not is_target(t.name, t.dtype, t.shape, matcher):
                if t.name.endswith(".weight") and len(t.shape) == 2 and listed_in_ignore(t.name[:-7]):
                    skipped.append(t.name[:-7])  # a Linear left unquantized: loaders must know
                out.append(base if base.name == t.name else OutputTensor(t.name, base.dtype, base.shape,
                                                                         base.transform, base.sources, base.params))
                continue
            if not scheme.fits(t.shape):
                misfits.append(f"{shard.file}: tensor {t.name!r} {list(t.shape)}: {t.shape[-1]} columns are not "
                               f"a multiple of {scheme.col_multiple}")
                continue
            module = t.name[: -len(".weight")]
            gid = group_of(t.name, groups) or t.name
            common = (("inner", _inner(base)), ("kernel", scheme.kernel), ("rounding", rounding),
                      ("weight", t.name))
            scale = ("global_scale", None) if scheme.kernel == "nvfp4" else ("global_scale", 0.0)
            for name, dtype, shape, role in scheme.outputs(module, t.dtype, t.shape):
                if role == "weight":
                    params = common + (("group", gid), scale, ("scale_name", f"{module}.weight_scale"))
                    out.append(OutputTensor(name, dtype, shape, QUANT_WEIGHT.name, base.sources, params))
                elif role == "scale":
                    out.append(OutputTensor(name, dtype, shape, QUANT_SCALE.name, (), (("of", t.name),)))
                else:
                    out.append(OutputTensor(name, dtype, shape, QUANT_CONST.name, (), (("group", gid), scale)))
            if scheme.kernel == "nvfp4":
                amax.append(OutputTensor(t.name, "F32", (1,), QUANT_AMAX.name, base.sources, common))
        shards.append(ShardPlan(shard.file, tuple(out)))
        if amax:
            amax_shards.append(ShardPlan(f"amax-{k:05d}.safetensors", tuple(amax)))
    if misfits:
        raise PlanError(f"--quantize {scheme.name}: {len(misfits)} weight(s) cannot take the scheme's "
                        f"{scheme.col_multiple}-column groups; nothing was written. Leave them out with "
                        "--ignore MODULE, or choose fp8-block / fp8-channel:\n"
                        + "\n".join(f"  - {m}" for m in misfits[:200]))
    config = copy.deepcopy(source.config) if source.config is not None else {}
    ignore_list = ["lm_head", *[p for p in (ignore or ()) if p != "lm_head"],
                   *sorted(m for m in set(skipped) if not (matcher and matcher.matches(m)))]
    config["quantization_config"] = quant_config(scheme, ignore_list)
    stage = "quantize" if upstream is None else f"{upstream.stage}+quantize"
    dropped = upstream.dropped if upstream is not None else ()
    write = StagePlan(stage, tuple(shards), config, dropped,
                      (upstream.warnings if upstream is not None else ()) + layout.warnings,
                      copy_files=upstream.copy_files if upstream is not None else None)
    amax_plan = StagePlan(AMAX_STAGE, tuple(amax_shards), {}, copy_files=()) if amax_shards else None
    return amax_plan, write


def with_global_scales(plan: StagePlan, amax: dict[str, float]) -> StagePlan:
    """`plan` with each NVFP4 weight's and global-scale tensor's `global_scale` set: one value per
    fused group, from the largest amax of its members (`amax`: weight name → amax)."""
    import torch

    from ckptflow.tasks.kernels.dtype_map import ST_TO_TORCH
    from ckptflow.tasks.kernels.quant_fp4 import nvfp4_global_scale

    group_amax: dict[str, float] = {}
    group_dtype: dict[str, str] = {}  # compressed-tensors computes the global scale in the weight's dtype
    for s in plan.shards:
        for t in s.tensors:
            if t.transform == QUANT_WEIGHT.name and t.param("kernel") == "nvfp4":
                name = t.param("weight")
                if name not in amax:
                    raise PlanError(f"the amax pass has no value for {name!r}; delete the work location "
                                    "and run again")
                gid = t.param("group")
                group_amax[gid] = max(group_amax.get(gid, 0.0), amax[name])
                group_dtype.setdefault(gid, t.param("inner")[1])
    # the amax of a BF16/F16 tensor is one of its values: F32 holds it exactly, and casts back exactly
    scales = {g: float(nvfp4_global_scale(torch.tensor(a, dtype=torch.float32).to(ST_TO_TORCH[group_dtype[g]])))
              for g, a in group_amax.items()}

    def fill(t: OutputTensor) -> OutputTensor:
        if t.param("global_scale", 0.0) is None:
            params = tuple((k, scales[t.param("group")] if k == "global_scale" else v) for k, v in t.params)
            return OutputTensor(t.name, t.dtype, t.shape, t.transform, t.sources, params)
        return t

    return StagePlan(plan.stage, tuple(ShardPlan(s.file, tuple(fill(t) for t in s.tensors)) for s in plan.shards),
                     plan.config, plan.dropped, plan.warnings, plan.write_index, plan.copy_files,
                     plan.dropped_unmatched)

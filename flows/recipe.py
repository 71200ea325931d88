"""What a conversion does, as data, and how its stages become passes over the bytes.

Stages are planned on headers alone; a later stage is planned on the *planned* output of the
earlier one, so every planning error (missing scale, indivisible split, unmatched name, dtype
mismatch) is raised before a byte is written. Stages made of copies and slices (reindex, MP)
fold into the previous pass (`compose`): dequant → MP reads the FP8 bytes each rank needs and
writes its slice, no intermediate checkpoint. `fuse=False` keeps the two-pass route (through
the work location), the reference a fused pass must equal byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ckptflow.storage.errors import problem_list
from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.tasks.plan.compose import compose, keeps_quant_config, planned_checkpoint
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.planners.torch_dtype import check_plan, fix_dtypes, identity_plan
from ckptflow.tasks.plan.model import PlanError, StagePlan

from ckptflow.flows.params import Recipe


@dataclass(frozen=True)
class Pass:
    plan: StagePlan
    into_work: bool          # True: writes an intermediate under the work location
    replan: str | None = None  # stage to plan again on the real intermediate ("mp"), or from the side
                               # pass before it ("quantize": NVFP4 global scales from the amax pass)
    side: bool = False       # writes what the next pass reads beside the source (the amax pass)


def _check_dtypes(plan: StagePlan, ckpt: Checkpoint, recipe: Recipe) -> None:
    config = plan.config if plan.config is not None else ckpt.config
    report = check_plan(plan, config, recipe.allow_dtypes or (),
                        ckpt.quant_config if keeps_quant_config(plan) else None)
    if not report.ok:
        raise PlanError(f"{len(report.mismatches)} tensor(s) would not match config.json's torch_dtype "
                        f"({report.expected}); add --fix-dtypes to cast them, or --allow-dtype REGEX for "
                        "tensors that are meant to differ:\n" + problem_list(report.mismatches))


def plan_mp_stage(ckpt: Checkpoint, recipe: Recipe) -> StagePlan:
    from ckptflow.tasks.planners.mp import plan_mp

    if recipe.mp is None or recipe.mp < 1:
        raise PlanError(f"--mp must be a positive integer, got {recipe.mp}")
    # no --preset: plan_mp takes the one config.json's model_type names (the intermediate of a
    # two-pass run keeps the source's model_type, so both plans use the same table)
    return plan_mp(ckpt, recipe.mp, recipe.preset, drop_unmatched=recipe.drop_unmatched)


def plan_passes(ckpt: Checkpoint, recipe: Recipe, fuse: bool = True) -> tuple[list[Pass], list[str]]:
    """The passes to run, and warnings about the recipe itself."""
    warnings: list[str] = []
    if not (recipe.dequant or recipe.fix_dtypes or recipe.reindex or recipe.mp or recipe.quantize):
        raise PlanError("nothing to do: choose a stage (--dequant, --fix-dtypes, --reindex, --quantize, --mp N)")
    if recipe.reindex and recipe.mp:
        warnings.append("--reindex is pointless before --mp (rank files are laid out by the MP "
                        "preset); skipping it")
    plan: StagePlan | None = None
    if recipe.dequant:
        plan = plan_dequant(ckpt, allow_missing_scale=recipe.allow_missing_scale,
                            allow_nonfinite=recipe.allow_nonfinite)
    if recipe.fix_dtypes:
        base = plan or identity_plan(ckpt)
        config = base.config if base.config is not None else ckpt.config
        plan = replace(fix_dtypes(base, config, recipe.allow_dtypes or ()), stage=f"{base.stage}+fix-dtypes"
                       if plan else "fix-dtypes")
    if recipe.quantize:
        return _quantize_passes(ckpt, recipe, plan), warnings
    if recipe.reindex and not recipe.mp:
        from ckptflow.tasks.planners.reindex import load_fused_groups, plan_reindex
        from ckptflow.tasks.plan.sizes import parse_size

        size = parse_size(recipe.max_shard_size)
        groups = load_fused_groups(recipe.fused_groups)
        upstream = planned_checkpoint(plan, ckpt.url, ckpt) if plan else ckpt
        reindexed = plan_reindex(upstream, size, groups)
        plan = compose(plan, reindexed) if plan else reindexed
        if plan is None:  # compose() only fails for non-copy downstream tensors
            raise PlanError("internal: reindex produced a non-copy tensor")
    if recipe.mp:
        if plan is None:
            mp = plan_mp_stage(ckpt, recipe)
            _check_dtypes(mp, ckpt, recipe)
            return [Pass(mp, into_work=False)], warnings
        _check_dtypes(plan, ckpt, recipe)
        intermediate = planned_checkpoint(plan, ckpt.url, ckpt)
        mp = plan_mp_stage(intermediate, recipe)  # errors now, not after the first pass
        _check_dtypes(mp, intermediate, recipe)
        fused = compose(plan, mp) if fuse else None
        if fused is not None:
            return [Pass(fused, into_work=False)], warnings
        return [Pass(plan, into_work=True), Pass(mp, into_work=False, replan="mp")], warnings
    assert plan is not None  # one of the stages above ran
    _check_dtypes(plan, ckpt, recipe)
    return [Pass(plan, into_work=False)], warnings


def _quantize_passes(ckpt: Checkpoint, recipe: Recipe, upstream: StagePlan | None) -> list[Pass]:
    """--quantize on top of the per-tensor stages before it, in one write pass laid out like
    --reindex (so --reindex adds nothing); NVFP4 first runs its amax pass."""
    from ckptflow.tasks.plan.sizes import parse_size
    from ckptflow.tasks.planners.quant_targets import quant_scheme
    from ckptflow.tasks.planners.quantize import plan_quantize
    from ckptflow.tasks.planners.reindex import load_fused_groups

    if recipe.mp:
        raise PlanError("--quantize writes a Hugging Face layout; it does not combine with --mp")
    amax, write = plan_quantize(ckpt, quant_scheme(recipe.quantize), rounding=recipe.rounding,
                                ignore=recipe.ignore, upstream=upstream,
                                max_shard_size=parse_size(recipe.max_shard_size),
                                groups=load_fused_groups(recipe.fused_groups))
    _check_dtypes(write, ckpt, recipe)
    if amax is None:
        return [Pass(write, into_work=False)]
    return [Pass(amax, into_work=True, side=True), Pass(write, into_work=False, replan="quantize")]

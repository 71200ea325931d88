"""Plan model-parallel shards: one file per rank, tensors renamed, split or routed by a preset.

Pure: headers + config.json in, a `StagePlan` out. Every problem that would make a rank file
wrong — a name no preset row covers, a split dim N does not divide, an expert count N does not
divide, an FP8 scale whose blocks would straddle two ranks — is collected and raised as one
`PlanError` before any byte is written. Each rank file is then one executor task ("copy" for
whole tensors, "slice" for splits), so no process ever holds more than a few chunks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import FP8_DTYPES, TensorInfo

from ckptflow.tasks.planners.dequant import SCALE_SUFFIX, block_size_from_config
from ckptflow.tasks.planners.mp_unmatched import broken_groups, listed, suggestion
from ckptflow.tasks.presets.fused_groups import FusedGroup, load_fused_groups
from ckptflow.tasks.presets.mp import Mapped, Preset, Split, load_preset, map_name, preset_for_config
from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, SourceRef, StagePlan

# load_preset / Preset live in tasks/presets/mp.py; re-exported because flows/recipe.py imports them from here.
__all__ = ["plan_mp", "load_preset", "Preset", "Split"]


@dataclass(frozen=True)
class _Item:
    file: str
    info: TensorInfo
    mapped: Mapped

    @property
    def target(self) -> str:
        return self.mapped.target  # type: ignore[return-value]  (dropped rows never become items)

    def label(self) -> str:
        return f"{self.target!r} (from {self.info.name!r} in {self.file})"


def _config_int(config: dict[str, Any], key: str, why: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PlanError(f"config.json: {key} is {value!r}; {why} needs it as a non-negative integer "
                        "(fix config.json, or use a preset that does not need it)")
    return value


def _dropped_layers(preset: Preset, config: dict[str, Any], names: list[str]) -> tuple[set[str], list[str]]:
    """Names inside the preset's dropped layer range, and names in layers beyond it (errors)."""
    drop = preset.drop_layers
    if drop is None:
        return set(), []
    layered = [(n, i) for n in names if (i := drop.layer_of(n)) is not None]
    if not layered:
        return set(), []
    why = f"dropping layers by '{preset.source}'"
    first = _config_int(config, drop.first, why)
    count = _config_int(config, drop.count, why, default=0)
    dropped = {n for n, i in layered if first <= i < first + count}
    beyond = sorted({i for _, i in layered if i >= first + count})
    errors = [f"layer {i}: tensors exist in layer {i}, but config.json says {drop.first}={first} and "
              f"{drop.count}={count}, so no such layer should exist; fix config.json" for i in beyond]
    return dropped, errors


def _scale_alignment(items: dict[str, _Item], world: int, block: tuple[int, int]) -> list[str]:
    """FP8 block scales must split with their weight, on block boundaries, or a rank dequantizes
    its rows with another block's scale — silently wrong numbers, which the seed does not check."""
    errors = []
    for name, scale in items.items():
        weight = items.get(name[: -len(SCALE_SUFFIX)]) if name.endswith(SCALE_SUFFIX) else None
        if weight is None or weight.info.dtype not in FP8_DTYPES:
            continue
        ws, ss = weight.mapped.rule.split, scale.mapped.rule.split
        if ws != ss or weight.mapped.captures.get("expert") != scale.mapped.captures.get("expert"):
            errors.append(f"{scale.label()}: split {ss.value} but its weight {weight.label()} is split "
                          f"{ws.value}; give both rows the same split in the preset")
            continue
        dim = ws.dim
        if dim is None or world == 1 or dim >= len(weight.info.shape) or dim >= len(scale.info.shape):
            continue
        w_size, s_size = weight.info.shape[dim], scale.info.shape[dim]
        if w_size % world or s_size % world:
            continue  # reported as a divisibility error
        rows_per_block = block[0] if dim == len(weight.info.shape) - 2 else \
            block[1] if dim == len(weight.info.shape) - 1 else 1
        if w_size // world != (s_size // world) * rows_per_block:
            errors.append(f"{weight.label()}: split {ws.value} gives each rank {w_size // world} of {w_size} "
                          f"along dim {dim}, not a whole number of {rows_per_block}-wide FP8 blocks, so its "
                          f"scale {scale.info.name!r} cannot be split with it; choose N so that {w_size}/N "
                          f"is a multiple of {rows_per_block}, or dequantize to BF16 first")
    return errors


def _outputs(item: _Item, world: int, per_rank: int | None) -> list[tuple[int, OutputTensor]]:
    """(rank, output tensor) pairs for one source tensor; divisibility already checked."""
    info, split = item.info, item.mapped.rule.split
    src = SourceRef.of(item.file, info)
    whole = OutputTensor(item.target, info.dtype, tuple(info.shape), "copy", (src,))
    if split is Split.REPLICATED:
        return [(r, whole) for r in range(world)]
    if split is Split.EXPERT:
        return [(int(item.mapped.captures["expert"]) // per_rank, whole)]  # type: ignore[operator]
    dim = split.dim
    if world == 1:
        return [(0, whole)]
    step = info.shape[dim] // world
    shape = tuple(step if d == dim else s for d, s in enumerate(info.shape))
    return [(r, OutputTensor(item.target, info.dtype, shape, "slice", (src,),
                             (("dim", dim), ("start", r * step), ("stop", (r + 1) * step))))
            for r in range(world)]


def _map_all(preset: Preset, tensors: list[tuple[str, TensorInfo]], drop: set[str],
             errors: list[str]) -> tuple[dict[str, _Item], list[str], list[str]]:
    """(kept items by source name, dropped names, unmatched names); name collisions → errors."""
    items: dict[str, _Item] = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    owner: dict[str, str] = {}
    for file, info in tensors:
        mapped = None if info.name in drop else map_name(preset, info.name)
        if info.name in drop or (mapped is not None and mapped.target is None):
            dropped.append(info.name)
        elif mapped is None:
            unmatched.append(info.name)
        elif mapped.target in owner:
            errors.append(f"{info.name!r} and {owner[mapped.target]!r} both map to {mapped.target!r}; "
                          "fix the preset so each output name has one source")
        else:
            owner[mapped.target] = info.name
            items[info.name] = _Item(file, info, mapped)
    return items, dropped, unmatched


def _experts_per_rank(items: dict[str, _Item], preset: Preset, config: dict[str, Any], world: int,
                      errors: list[str]) -> int | None:
    """Routed experts per rank (rank r owns experts [r·E/N, (r+1)·E/N)), or None if no EXPERT rows."""
    experts = [i for i in items.values() if i.mapped.rule.split is Split.EXPERT]
    if not experts:
        return None
    try:
        n = _config_int(config, preset.experts or "", f"partitioning experts by '{preset.source}'")
    except PlanError as exc:
        errors.append(str(exc))
        return None
    if n == 0 or n % world:
        errors.append(f"config.json: {preset.experts}={n} routed experts cannot be split evenly over "
                      f"{world} ranks; choose a world size that divides {n}")
    errors += [f"{i.label()}: expert {i.mapped.captures['expert']} but config.json says "
               f"{preset.experts}={n}; fix config.json"
               for i in experts if int(i.mapped.captures["expert"]) >= n]
    return max(1, n // world)


def _split_problems(items: dict[str, _Item], world: int) -> list[str]:
    errors = []
    for item in items.values():
        split, shape = item.mapped.rule.split, item.info.shape
        if split.dim is None:
            continue
        if split.dim >= len(shape):
            errors.append(f"{item.label()}: a {split.value} split needs dim {split.dim}, but the tensor has "
                          f"shape {list(shape)}; mark its row REPLICATED or COLUMN in the preset")
        elif shape[split.dim] % world:
            errors.append(f"{item.label()}: {split.value} split along dim {split.dim} of size "
                          f"{shape[split.dim]} (shape {list(shape)}) is not divisible by N={world}")
    return errors


def _resolve(preset: Preset | str | Path | None, config: dict[str, Any], names: list[str]) -> Preset:
    """`preset` loaded; None: the built-in one config.json's model_type names (an error otherwise,
    saying which built-in preset would match every tensor, if one would)."""
    if isinstance(preset, Preset):
        return preset
    if preset is not None:
        return load_preset(preset)
    try:
        return load_preset(preset_for_config(config))
    except PlanError as exc:
        hint = suggestion(names, config, them="every tensor of this checkpoint")
        raise PlanError(f"{exc}" + (f" ({hint})" if hint else "")) from None


def _unmatched_problem(preset: Preset, config: dict[str, Any], names: list[str], unmatched: list[str],
                       kept: Sequence[str], drop_unmatched: bool,
                       fused_groups: Sequence[FusedGroup] | None) -> str | None:
    """Why the unmatched names stop the plan (and what to pass instead), or None to drop them."""
    if not unmatched:
        return None
    if drop_unmatched:
        groups = load_fused_groups() if fused_groups is None else fused_groups
        broken = broken_groups(unmatched, kept, groups)
        if broken is None:
            return None
        hint = suggestion(names, config, but=preset.source, them="every tensor of this checkpoint")
        return f"{broken}; {hint or 'add rows for the dropped ones to the preset (--preset FILE|URL)'}"
    hint = suggestion(names, config, but=preset.source)
    return (f"{len(unmatched)} tensor name(s) match no row of preset '{preset.source}' (first: {unmatched[0]}); "
            + (hint or "add rows for them (--preset FILE|URL), or pass --drop-unmatched to drop them")
            + ":\n" + listed(unmatched))


def plan_mp(ckpt: Checkpoint, world: int, preset: Preset | str | Path | None = None, *,
            drop_unmatched: bool = False, fused_groups: Sequence[FusedGroup] | None = None) -> StagePlan:
    """`world` rank files laid out by `preset` (None: the one config.json's model_type names); raises
    `PlanError` naming every problem at once. `fused_groups` (default: the built-in table) says
    which tensors `drop_unmatched` may not separate."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise PlanError(f"model-parallel world size must be a positive integer, got {world!r}")
    if ckpt.header_errors:
        raise PlanError("cannot plan MP shards while some headers are unreadable (their tensors would be "
                        "missing from every rank): " + "; ".join(f"{f}: {e}" for f, e in
                                                                   sorted(ckpt.header_errors.items())))
    config = ckpt.config or {}
    # Source order (file, offset): each rank task then reads every file front to back.
    tensors = sorted(ckpt.tensors().values(), key=lambda fi: (fi[0], fi[1].start))
    names = [info.name for _, info in tensors]
    preset = _resolve(preset, config, names)
    try:
        drop, errors = _dropped_layers(preset, config, names)
    except PlanError as exc:  # still report the other problems with it
        drop, errors = set(), [str(exc)]
    items, dropped, unmatched = _map_all(preset, tensors, drop, errors)
    if (problem := _unmatched_problem(preset, config, names, unmatched, list(items), drop_unmatched,
                                      fused_groups)) is not None:
        errors.append(problem)
    per_rank = _experts_per_rank(items, preset, config, world, errors)
    errors += _split_problems(items, world)
    if any(n.endswith(SCALE_SUFFIX) for n in items):
        errors += _scale_alignment(items, world, block_size_from_config(ckpt.config))
    if errors:
        raise PlanError(f"cannot shard {ckpt.url} for {world}-way model parallelism with preset "
                        f"'{preset.source}'; {len(errors)} problem(s), nothing was written:\n"
                        + "\n".join(f"  - {e}" for e in errors))
    ranks: list[list[OutputTensor]] = [[] for _ in range(world)]
    for item in items.values():
        for rank, out in _outputs(item, world, per_rank):
            ranks[rank].append(out)
    shards = tuple(ShardPlan(preset.output_file.format(rank=r, world=world), tuple(ts))
                   for r, ts in enumerate(ranks))
    warnings = (f"--drop-unmatched: {len(unmatched)} tensor(s) match no row of preset '{preset.source}' and "
                "are not written (each is listed under 'dropped')",) if unmatched else ()
    return StagePlan("mp", shards, None, tuple(sorted(dropped + unmatched)), warnings,
                     write_index=preset.write_index, copy_files=preset.copy_files,
                     dropped_unmatched=tuple(unmatched))

"""Read headers, validate and plan every pass of a conversion: no Prefect, no torch, no writes.

The CLI calls `plan_conversion` before Prefect starts, so any input error (missing source,
invalid index, unknown preset, an indivisible `--mp`) reaches the user as one `error:` line in
about a second instead of after a server start-up. `convert_flow` calls the same function, so a
deployment run (which never comes through the CLI) checks exactly the same things. In the CLI
process the flow reuses the plan the CLI just made (`remember` / the key below) instead of
reading every header and planning again: for DeepSeek-V3 that is seconds, not free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ckptflow.storage.checkpoint import Checkpoint, scan_checkpoint
from ckptflow.storage.urls import Location
from ckptflow.tasks.validate import raise_on_errors

from ckptflow.tasks.run.engine import EnginePass

from ckptflow.flows.params import Recipe
from ckptflow.flows.recipe import Pass, plan_mp_stage, plan_passes


@dataclass(frozen=True)
class Preflight:
    """What a conversion will do, known before it writes a byte."""

    ckpt: Checkpoint
    recipe: Recipe
    passes: list[Pass]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(p.plan.total_size for p in self.passes)

    @property
    def total_shards(self) -> int:
        return sum(len(p.plan.shards) for p in self.passes)

    def engine_passes(self) -> list[EnginePass]:
        """The passes as the engine runs them (`ckptflow.tasks.run.engine`)."""
        recipe = self.recipe
        return [EnginePass(p.plan, p.into_work, (lambda c: plan_mp_stage(c, recipe)) if p.replan == "mp" else None,
                           side=p.side, side_replan=_global_scales(p.plan) if p.replan == "quantize" else None)
                for p in self.passes]


def _global_scales(plan):  # noqa: ANN001, ANN202 - a closure over one plan
    from ckptflow.tasks.planners.quantize import with_global_scales
    from ckptflow.tasks.run.quant_amax import read_amax

    return lambda loc, written: with_global_scales(plan, read_amax(loc, written))


# Plans made in this process, by (source url, recipe): at most the CLI's one conversion. A
# deployment's worker process never fills it, so it always plans afresh.
_PLANNED: dict[str, Preflight] = {}


def _key(src: Location, recipe: Recipe) -> str:
    return json.dumps([src.url, repr(recipe)])


def plan_conversion(src: Location, recipe: Recipe, reuse: bool = False) -> Preflight:
    """Scan `src`'s headers, validate them against the index and plan every pass of `recipe`.

    Raises the `UserError` the first problem calls for (`ValidationFailed`, `PlanError`, a
    `StorageError` for a missing source). With `reuse`, a plan this process made for the same
    source and recipe is returned as it is, provided no weight file changed identity since.
    """
    key = _key(src, recipe)
    if reuse and key in _PLANNED and _unchanged(_PLANNED[key].ckpt, src):
        return _PLANNED.pop(key)
    ckpt = scan_checkpoint(src)
    warnings = [str(w) for w in raise_on_errors(ckpt)]
    passes, recipe_warnings = plan_passes(ckpt, recipe)
    if recipe.dequant:  # global and per-tensor scales: a few bytes each, read before a byte is written
        from ckptflow.tasks.run.scale_preflight import check_small_scales

        check_small_scales(src, [p.plan for p in passes if p.replan is None])
    warnings += recipe_warnings + [w for p in passes for w in p.plan.warnings]
    return Preflight(ckpt, recipe, passes, warnings)


def remember(src: Location, planned: Preflight) -> None:
    """Keep `planned` for the flow this process is about to run on `src`."""
    _PLANNED.clear()
    _PLANNED[_key(src, planned.recipe)] = planned


def _unchanged(ckpt: Checkpoint, src: Location) -> bool:
    """Do the files still have the sizes and versions (etag / mtime+ctime+inode) the plan was made
    from? One listing, no header reads: a file replaced between the CLI's check and the flow's
    start is planned again rather than trusted. Any doubt also plans again."""
    from ckptflow.storage.listing import list_tree

    try:
        now = list_tree(src)
    except Exception:  # noqa: BLE001 - planning again raises the real error, if there is one
        return False
    return ({n: s.size for n, s in now.items()} == ckpt.files
            and all(now[n].version == ckpt.versions.get(n) for n in ckpt.weight_files))

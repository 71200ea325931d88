"""Plan `reindex`: rewrite the shards so that every fused group (q/k/v, gate/up, …) is in one file.

llm-compressor's `reindex_fused_weights` walks files alphabetically and carries a split group
into the next file; real checkpoints break that (every `q_proj` in one shard, every `k/v` in
another; `layers.10` before `layers.2`). This planner decides globally, from headers alone:

1. A *unit* is a fused group (every tensor of its modules) or an ungrouped tensor. A unit that
   lies wholly in one file stays there — files that already satisfy the constraint keep all
   their tensors.
2. A file over `max_shard_size` sheds whole units (the fewest bytes it can) until it fits.
3. Each split or shed unit, largest first, goes whole into the file that already holds most of
   its bytes if it fits, else into the first file (numeric-aware name order) with room, else into
   the newest new file, else a new file. A unit bigger than the limit gets a file of its own and
   a warning.

Shard size is the sum of tensor data bytes, headers excluded — the convention of Hugging Face's
`max_shard_size`. Output files are renumbered `model-{k:05d}-of-{n:05d}.safetensors` over the
surviving source files (numeric-aware order), then the new ones; empty files are dropped.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import chain

from ckptflow.storage.errors import problem_list
from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import TensorInfo

from ckptflow.tasks.plan.sizes import parse_size
from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, SourceRef, StagePlan
from ckptflow.tasks.presets.fused_groups import FusedGroup, group_of, load_fused_groups

# The table lives in tasks/presets/fused_groups.py; re-exported for flows/recipe.py and the tests.
__all__ = ["DEFAULT_MAX_SHARD_SIZE", "FusedGroup", "group_of", "load_fused_groups", "moved_bytes",
           "moved_tensors", "natural_key", "plan_reindex"]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def natural_key(name: str) -> tuple:
    """Numeric-aware order: model-2 before model-10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


Unit = tuple[str, str]          # ("group", group id) or ("tensor", name)
Member = tuple[str, TensorInfo]  # (source file, header entry)


@dataclass
class _Bin:
    """An output file being filled: a source file's continuation, or a new file."""

    units: list[Unit] = field(default_factory=list)
    load: int = 0


def _units(ckpt: Checkpoint, files: list[str], groups: list[FusedGroup]) -> dict[Unit, list[Member]]:
    units: dict[Unit, list[Member]] = {}
    seen: dict[str, str] = {}
    twice: list[str] = []
    for f in files:
        for name, info in sorted(ckpt.headers[f].tensors.items(), key=lambda kv: kv[1].start):
            if name in seen:
                twice.append(f"{name!r} in {seen[name]} and {f}")
                continue
            seen[name] = f
            gid = group_of(name, groups)
            units.setdefault(("group", gid) if gid is not None else ("tensor", name), []).append((f, info))
    if twice:
        raise PlanError(f"{ckpt.url}: {len(twice)} tensor(s) appear in two files (a stale shard left "
                        "over?); remove the file that is not in the index:\n"
                        + problem_list(twice, 20))
    return units


def _shed(b: _Bin, size: dict[Unit, int], limit: int) -> list[Unit]:
    """Units to take out of an over-full source file, moving as few bytes as it can."""
    big = [u for u in b.units if size[u] > limit]
    if big:  # the largest oversize unit keeps the file alone
        keep = max(big, key=size.__getitem__)
        out = [u for u in b.units if u != keep]
    else:  # repeatedly: the smallest unit that ends the excess, else the largest one
        order = sorted(b.units, key=size.__getitem__)
        sizes = [size[u] for u in order]
        out, total = [], b.load
        while total > limit:
            j = min(bisect_left(sizes, total - limit), len(sizes) - 1)
            sizes.pop(j)
            out.append(order.pop(j))
            total -= size[out[-1]]
    gone = set(out)
    b.units = [u for u in b.units if u not in gone]
    b.load -= sum(size[u] for u in out)
    return out


def plan_reindex(ckpt: Checkpoint, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 groups: list[FusedGroup] | None = None) -> StagePlan:
    """Every tensor copied into an output shard so that each fused group is in one file."""
    limit = parse_size(max_shard_size)
    groups = load_fused_groups(None) if groups is None else groups
    if ckpt.header_errors:
        raise PlanError("cannot reindex with unreadable shards (their tensors would be lost):\n"
                        + problem_list(f"{f}: {r}" for f, r in sorted(ckpt.header_errors.items())))
    files = sorted(ckpt.headers, key=natural_key)
    rank = {f: i for i, f in enumerate(files)}
    units = _units(ckpt, files, groups)
    if not units:
        raise PlanError(f"{ckpt.url}: no tensors to reindex")
    size = {u: sum(i.nbytes for _, i in ms) for u, ms in units.items()}
    bins = {f: _Bin() for f in files}
    pending: list[Unit] = []
    for u, ms in units.items():
        homes = {f for f, _ in ms}
        if len(homes) == 1:
            b = bins[ms[0][0]]
            b.units.append(u)
            b.load += size[u]
        else:
            pending.append(u)
    for b in bins.values():
        if b.load > limit and len(b.units) > 1:
            pending += _shed(b, size, limit)
    new: list[_Bin] = []
    pending.sort(key=lambda u: (-size[u], rank[units[u][0][0]], units[u][0][1].start))
    for u in pending:
        held: dict[str, int] = {}
        for f, info in units[u]:
            held[f] = held.get(f, 0) + info.nbytes
        homes = sorted(held, key=lambda f: (-held[f], rank[f]))
        # emptied source files stay gone; new files fill one at a time (largest units first)
        others = (bins[f] for f in files if f not in held and bins[f].load > 0)
        candidates = chain((bins[f] for f in homes), others, new[-1:])
        target = next((b for b in candidates if b.load + size[u] <= limit), None)
        if target is None:
            target = _Bin()
            new.append(target)
        target.units.append(u)
        target.load += size[u]
    alive = [b for b in [*bins.values(), *new] if b.units]
    shards, warnings = [], []
    for k, b in enumerate(alive, start=1):
        name = f"model-{k:05d}-of-{len(alive):05d}.safetensors"
        members = sorted((m for u in b.units for m in units[u]),
                         key=lambda m: (rank[m[0]], m[1].start, m[1].name))
        shards.append(ShardPlan(name, tuple(OutputTensor(i.name, i.dtype, tuple(i.shape), "copy",
                                                         (SourceRef.of(f, i),)) for f, i in members)))
        for u in b.units:
            if size[u] > limit:
                what = f"group {u[1]!r} ({len(units[u])} tensors)" if u[0] == "group" else f"tensor {u[1]!r}"
                warnings.append(f"{what} is {size[u]} bytes, over max_shard_size ({limit}); "
                                f"it gets a shard of its own, {name}")
    return StagePlan("reindex", tuple(shards), None, (), tuple(warnings))


def _moved(plan: StagePlan, ckpt: Checkpoint) -> list[OutputTensor]:
    """Output tensors that changed files: each output shard is matched to at most one source file
    (greedily, most shared bytes first); a tensor moved if its first source is not its shard's match.
    Name-agnostic, so it measures any plan (composed ones too) against its source checkpoint."""
    rank = {f: i for i, f in enumerate(sorted(ckpt.headers, key=natural_key))}
    shared: dict[tuple[int, str], list[int]] = {}
    for k, s in enumerate(plan.shards):
        for t in s.tensors:
            src = t.sources[0]
            acc = shared.setdefault((k, src.file), [0, 0])
            acc[0] += src.end - src.start
            acc[1] += 1
    origin: dict[int, str] = {}
    taken: set[str] = set()
    for (k, f), _ in sorted(shared.items(), key=lambda kv: (
            -kv[1][0], -kv[1][1], kv[0][0], rank.get(kv[0][1], len(rank)), kv[0][1])):
        if k not in origin and f not in taken:
            origin[k] = f
            taken.add(f)
    return [t for k, s in enumerate(plan.shards) for t in s.tensors if t.sources[0].file != origin.get(k)]


def moved_tensors(plan: StagePlan, ckpt: Checkpoint) -> int:
    """How many output tensors are not in the file that continues their source file."""
    return len(_moved(plan, ckpt))


def moved_bytes(plan: StagePlan, ckpt: Checkpoint) -> int:
    return sum(t.sources[0].end - t.sources[0].start for t in _moved(plan, ckpt))

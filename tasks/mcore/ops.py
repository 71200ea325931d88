"""The split operations a Megatron-Core table can name, as row ranges. Pure: ints in, ints out.

A split never moves bytes itself: it says which rows of a (per-layer, per-expert) tensor each
target takes, as (start, stop) ranges concatenated in order. The planner turns ranges into byte
ranges of the checkpoint's chunks, so every family's QKV grouping or gate/up halving is the same
code path, bit for bit a copy.
"""
from __future__ import annotations

from ckptflow.tasks.plan.model import PlanError

Ranges = tuple[tuple[int, int], ...]


def merged(ranges: list[tuple[int, int]]) -> Ranges:
    """Adjacent ranges joined (one query group: q rows are one run), empty ones dropped."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def qkv_rows(rows: int, heads: int, groups: int, head_dim: int, key: str) -> tuple[Ranges, Ranges, Ranges]:
    """Megatron's fused linear_qkv rows are, per query group, [heads/groups q heads, 1 k head, 1 v head]
    (each `head_dim` rows): the (q, k, v) row ranges, each ordered by head as HF's q/k/v_proj are."""
    if groups <= 0 or heads % groups:
        raise PlanError(f"{key}: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}; "
                        "fix them with --config FILE")
    per = heads // groups
    if rows != (heads + 2 * groups) * head_dim:
        raise PlanError(f"{key}: {rows} fused QKV rows, but (num_attention_heads {heads} + 2 * num_key_value_heads "
                        f"{groups}) * head_dim {head_dim} = {(heads + 2 * groups) * head_dim}; the args (or --config) "
                        "do not describe this checkpoint")
    span = (per + 2) * head_dim
    q = [(g * span, g * span + per * head_dim) for g in range(groups)]
    k = [(g * span + per * head_dim, g * span + (per + 1) * head_dim) for g in range(groups)]
    v = [(g * span + (per + 1) * head_dim, (g + 1) * span) for g in range(groups)]
    return merged(q), merged(k), merged(v)


def halves_rows(rows: int, key: str) -> tuple[Ranges, Ranges]:
    """[first half; second half] rows: SwiGLU linear_fc1 is [all gate rows; all up rows] (TP ranks
    included: torch_dist places each rank's gate and up parts in their own half)."""
    if rows % 2:
        raise PlanError(f"{key}: {rows} rows cannot be halved into gate and up; not a SwiGLU linear_fc1")
    return ((0, rows // 2),), ((rows // 2, rows),)


def split_rows(split: str, rows: int, cfg: dict, key: str) -> tuple[Ranges, ...]:
    """The row ranges of each target of `split` (see `presets.mcore.SPLITS`), in target order."""
    if split == "none":
        return (((0, rows),),)
    if split == "qkv":
        return qkv_rows(rows, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], key)
    if split == "halves":
        return halves_rows(rows, key)
    raise PlanError(f"{key}: unknown split {split!r}")

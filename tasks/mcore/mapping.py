"""Apply a Megatron-Core table to an index: every HF tensor as a region of one global tensor. Pure.

A region is the stacked indices it fixes (layer, expert) and row ranges of the next dim (a QKV
group's q rows, a gate half, the true vocab rows), whole in every other dim. Everything is
checked here, before a byte is read: a key no row matches, a target made twice, a layer or expert
axis that disagrees with config.json, a split that does not fit; each one error naming the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptflow.tasks.mcore.index import GlobalTensor, McoreIndex
from ckptflow.tasks.mcore.ops import Ranges, split_rows
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.presets.mcore import McoreRule, McoreTable

# TransformerEngine's FP8 bookkeeping, saved beside each module's weights: not a weight
SKIPPED_SUFFIXES = ("._extra_state",)


@dataclass(frozen=True)
class HfTensor:
    name: str
    key: str                       # the global tensor it is cut from
    lead: tuple[int, ...]          # fixed indices of its stacked leading axes
    rows: Ranges                   # ranges of dim len(lead), concatenated in order
    shape: tuple[int, ...]
    dtype: str
    order: tuple[int, ...] = ()    # (layer, expert, row of the table, part): HF file order


def _count_check(gt: GlobalTensor, rule: McoreRule, cfg: dict[str, Any], experts_key: str) -> None:
    for dim, axis in enumerate(rule.stacked):
        want = cfg.get("num_hidden_layers") if axis == "layer" else cfg.get(experts_key)
        if gt.shape[dim] != want:
            cfg_key = "num_hidden_layers" if axis == "layer" else experts_key
            raise PlanError(f"{gt.key}: its {axis} axis (dim {dim}) has {gt.shape[dim]} entries, but config "
                            f"{cfg_key}={want}; the args (or --config) do not describe this checkpoint")


def _rows_of(gt: GlobalTensor, rule: McoreRule, cfg: dict[str, Any]) -> tuple[Ranges, ...]:
    n = len(rule.stacked)
    if len(gt.shape) <= n:
        raise PlanError(f"{gt.key}: shape {list(gt.shape)} has no dims left after its stacked axes "
                        f"{list(rule.stacked)}; the table's row {rule.source!r} does not fit it")
    rows = gt.shape[n]
    if rule.vocab:
        vocab = cfg["vocab_size"]
        if vocab > rows:
            raise PlanError(f"{gt.key}: {rows} vocab rows, fewer than vocab_size {vocab}; the vocab size "
                            "(args, --tokenizer or --config) is not this model's")
        rows = vocab  # Megatron's padding rows past the true vocab are never written
    return split_rows(rule.split, rows, cfg, gt.key)


def map_index(index: McoreIndex, table: McoreTable, cfg: dict[str, Any]) -> list[HfTensor]:
    """Every HF tensor the table makes from `index`, in HF order; raises a PlanError naming the key."""
    out: dict[str, HfTensor] = {}
    unknown: list[str] = []
    hidden = cfg.get("hidden_size")
    for key, gt in sorted(index.tensors.items()):
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        hit = table.match(key)
        if hit is None:
            unknown.append(key)
            continue
        rule, named = hit
        if rule.tied and cfg.get("tie_word_embeddings"):
            continue  # a tied output layer is the embedding: written once, as embed_tokens
        if all(t is None for t in rule.outputs):
            continue
        _count_check(gt, rule, cfg, table.experts_key)
        parts = _rows_of(gt, rule, cfg)
        n = len(rule.stacked)
        trailing = gt.shape[n + 1:]
        if trailing and hidden is not None and rule.split == "qkv" and trailing[-1] != hidden:
            raise PlanError(f"{key}: rows of {trailing[-1]} columns, but hidden_size={hidden}")
        row_idx = next(i for i, r in enumerate(table.rules) if r is rule)
        for lead in _leads(gt.shape[:n]):
            idx = dict(named, **dict(zip(rule.stacked, lead)))
            for part, (target, ranges) in enumerate(zip(rule.outputs, parts)):
                if target is None:
                    continue
                name = target.format(**idx)
                if name in out:
                    raise PlanError(f"{key}: makes {name}, which {out[name].key} makes too; the checkpoint mixes "
                                    f"key layouts, or {table.label} maps two keys to one name")
                nrows = sum(b - a for a, b in ranges)
                _dims_check(key, name, (nrows, *trailing), rule, cfg)
                order = (idx.get("layer", -1), idx.get("expert", -1), row_idx, part)
                out[name] = HfTensor(name, key, lead, ranges, (nrows, *trailing), gt.dtype, order)
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise PlanError(f"{index.root}: {len(unknown)} key(s) match no row of {table.label}: "
                        f"{', '.join(unknown[:10])}{more}. Another model family (--family), or one that needs a "
                        "table of its own (--table FILE|URL)")
    _check_complete(out, table, cfg)
    return sorted(out.values(), key=_hf_order)


def _dims_check(key: str, name: str, shape: tuple[int, ...], rule: McoreRule, cfg: dict[str, Any]) -> None:
    """The row's `dims`: each output dim the config key it names (fc1's halves: intermediate_size)."""
    for d, cfg_key in enumerate(rule.dims or ()):
        if cfg_key is None:
            continue
        if d >= len(shape) or cfg.get(cfg_key) != shape[d]:
            raise PlanError(f"{key}: makes {name} of shape {list(shape)}, but config {cfg_key}={cfg.get(cfg_key)} "
                            f"(dim {d}); the args (or --config) do not describe this checkpoint")


def _hf_order(t: HfTensor) -> tuple[int, int, tuple[int, ...], str]:
    # embeddings first, then layer by layer, the final norm and lm_head last
    layer = t.order[0] if t.order else -1
    head = t.name.startswith("lm_head") or t.name.endswith(("model.norm.weight",))
    return (2 if head else (1 if layer >= 0 else 0), layer, t.order, t.name)


def _check_complete(out: dict[str, HfTensor], table: McoreTable, cfg: dict[str, Any]) -> None:
    """Every non-optional target of the table for every layer (and expert) is made by some key.
    Rows that are alternatives (fused or standalone norms, stacked or named experts) share targets."""
    layers = range(int(cfg.get("num_hidden_layers") or 0))
    experts = range(int(cfg.get(table.experts_key) or 0))
    want: set[str] = set()
    for rule in table.rules:
        if rule.optional or (rule.tied and cfg.get("tie_word_embeddings")):
            continue
        for target in rule.outputs:
            if target is None:
                continue
            for layer in (layers if "{layer}" in target else [0]):
                for expert in (experts if "{expert}" in target else [0]):
                    want.add(target.format(layer=layer, expert=expert))
    if missing := sorted(want - set(out)):
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise PlanError(f"{table.label}: the checkpoint has nothing for {', '.join(missing[:8])}{more}; a key is "
                        "missing from the checkpoint, or it is another model family (--family / --table)")


def _leads(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if not shape:
        return [()]
    return [tuple(int(x) for x in divmod_index(i, shape)) for i in range(math.prod(shape))]


def divmod_index(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        i, r = divmod(i, d)
        out.append(r)
    return out[::-1]

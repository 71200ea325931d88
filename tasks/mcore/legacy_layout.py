"""Where each rank's local tensor sits in the global (torch_dist-shaped) tensor: pure, no I/O.

Megatron's parallel layout, as the saved arguments state it (never guessed from file names):
  * rank files `mp_rank_TT[_PPP][_EEE]`: `_PPP` exists when PP > 1, `_EEE` when EP > 1;
  * pipeline stage s holds layers [start_s, start_s + n_s): decoder_first/last_pipeline_num_layers
    set the first and last stage's counts, the rest split evenly;
  * EP rank r holds experts [r·E_local, (r+1)·E_local), as `local_experts.j` (SequentialMLP) or
    `weight{j}` (grouped GEMM);
  * tensor-parallel shards join on dim 0 (column-parallel), dim 1 (row-parallel) or not at all
    (replicated: one copy read, the others' shapes checked); SwiGLU's `linear_fc1` on rank r is
    [gate_r; up_r] and the global tensor is [all gate; all up].
Keys become torch_dist's: `decoder.layers.<rest>` with a leading layer axis, experts
`decoder.layers.mlp.experts.experts.<rest>` with [L, E, ...], the local spec's separate norms under
their fused names (`input_layernorm.` → `self_attention.linear_qkv.layer_norm_`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor
from ckptflow.tasks.megatron.safe import MegatronLoadError

COLUMN, ROW, REPLICATED = 0, 1, None
_RANK = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?/model_optim_rng\.pt")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")
_GROUPED = re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)")
_LEGACY_GROUPED = re.compile(r"mlp\.experts\.weight[12]")
# The local spec names these norms on their own; torch_dist saves them under the fused names.
_RENAMES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
            ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
# (pattern on the key's tail, split): first match wins; a key none matches is refused.
_SPLITS: tuple[tuple[re.Pattern, int | None], ...] = tuple((re.compile(p), s) for p, s in (
    (r"(^|\.)(word_embeddings|output_layer)\.weight$", COLUMN),
    (r"(^|\.)(linear_qkv|linear_fc1|linear_q_proj|linear_q_up_proj|linear_kv_up_proj)\.(weight|bias)$", COLUMN),
    (r"(^|\.)(linear_proj|linear_fc2)\.weight$", ROW),
    (r"(^|\.)(linear_proj|linear_fc2)\.bias$", REPLICATED),
    (r"(layer_norm_weight|layer_norm_bias|norm\.weight|norm\.bias)$", REPLICATED),
    (r"(^|\.)router\.(weight|bias|expert_bias)$", REPLICATED),
    (r"(^|\.)shared_experts\.gate_weight$", REPLICATED),
    (r"(^|\.)position_embeddings\.weight$", REPLICATED),
))


@dataclass(frozen=True)
class RankFile:
    name: str
    tp: int
    pp: int
    ep: int


@dataclass(frozen=True)
class LocalTensor:
    file: str
    byte_offset: int
    byte_length: int
    shape: tuple[int, ...]
    dtype: str


def _int(args: dict[str, Any], name: str, default: int | None = 1) -> int | None:
    v = args.get(name)
    if v is None:
        return default
    if type(v) is not int or v < 0:
        raise MegatronLoadError(f"saved argument {name}={v!r} is not a count")
    return v


def rank_files(names: Iterable[str], args: dict[str, Any], where: str) -> list[RankFile]:
    """The rank files TP×PP×EP (from `args`) requires, each with its ranks; an error if any differ."""
    tp, pp, ep = (_int(args, n) or 1 for n in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                               "expert_model_parallel_size"))
    if (_int(args, "virtual_pipeline_model_parallel_size") or 1) > 1:
        raise MegatronLoadError(f"{where}: a virtual-pipeline checkpoint (model0, model1, ... per rank); "
                                "not supported: save it as torch_dist instead")
    want = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                want[f"{name}/model_optim_rng.pt"] = RankFile(f"{name}/model_optim_rng.pt", t, p, e)
    have = {n for n in names if _RANK.fullmatch(n)}
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing or extra:
        raise MegatronLoadError(
            f"{where}: the saved arguments say TP={tp}, PP={pp}, EP={ep}, so the rank files are "
            f"{', '.join(sorted(want)[:3])}{', ...' if len(want) > 3 else ''}; "
            + "; ".join(f"{what}: {', '.join(n.split('/')[0] for n in names[:4])}"
                        for what, names in (("missing", missing), ("unexpected", extra)) if names)
            + " (incomplete copy, or files of another layout in the folder)")
    return sorted(want.values(), key=lambda r: r.name)


def stage_layers(args: dict[str, Any], pp: int, where: str) -> list[int]:
    """First global layer of each pipeline stage, and the total, as [start_0, ..., start_pp]."""
    total = _int(args, "num_layers", None)
    if total is None:
        raise MegatronLoadError(f"{where}: the saved arguments have no num_layers")
    if args.get("account_for_embedding_in_pipeline_split") or args.get("account_for_loss_in_pipeline_split") \
            or args.get("pipeline_model_parallel_layout"):
        raise MegatronLoadError(f"{where}: a custom pipeline layout; not supported: save it as torch_dist instead")
    counts: list[int | None] = [None] * pp
    if pp > 1:
        counts[0] = _int(args, "decoder_first_pipeline_num_layers", None)
        counts[-1] = _int(args, "decoder_last_pipeline_num_layers", None)
    rest, free = total - sum(c for c in counts if c), counts.count(None)
    if free and (rest < 0 or rest % free):
        raise MegatronLoadError(f"{where}: {total} layers do not split evenly over {free} pipeline stage(s) "
                                f"(first/last stages: {counts[0]}/{counts[-1]})")
    filled = [c if c is not None else rest // free for c in counts]
    if sum(filled) != total:
        raise MegatronLoadError(f"{where}: pipeline stages hold {filled} layers, not num_layers={total}")
    starts = [0]
    for c in filled:
        starts.append(starts[-1] + c)
    return starts


def _split(tail: str, key: str, where: str) -> int | None:
    for pattern, split in _SPLITS:
        if pattern.search(tail):
            return split
    raise MegatronLoadError(f"{where}: tensor {key!r}: no known tensor-parallel layout for it (column, row "
                            "or replicated); refused rather than guessed")


def _global_key(key: str, local_spec: bool = True) -> tuple[str, int | None, int | None, str]:
    """(torch_dist key, local layer, local expert, tail for the split table) of a legacy key.

    Only the local spec renames its separate norms for torch_dist; TransformerEngine's spec fuses
    them into linear_qkv / linear_fc1 already, and keeps a separate norm (MoE's pre_mlp_layernorm)
    under its own name."""
    m = _LAYER.fullmatch(key)
    if not m:
        return key, None, None, key
    layer, rest = int(m.group(1)), m.group(2)
    if _LEGACY_GROUPED.fullmatch(rest):
        raise MegatronLoadError(f"tensor {key!r}: a GroupedMLP weight (moe_grouped_gemm with the local spec) "
                                "holds its experts transposed ([hidden, experts × ffn]); the byte-range index "
                                "cannot express that: save this checkpoint as torch_dist to convert it")
    for old, new in _RENAMES if local_spec else ():
        if rest.startswith(old):
            rest = new + rest[len(old):]
    if e := _EXPERT.fullmatch(rest):
        return f"decoder.layers.mlp.experts.experts.{e.group(2)}", layer, int(e.group(1)), e.group(2)
    if g := _GROUPED.fullmatch(rest):
        return f"decoder.layers.mlp.experts.experts.{g.group(1)}.weight", layer, int(g.group(2)), g.group(1) + ".weight"
    return f"decoder.layers.{rest}", layer, None, rest


def build_global(ranks: dict[RankFile, dict[str, LocalTensor]], args: dict[str, Any],
                 where: str) -> dict[str, GlobalTensor]:
    """The global tensors the rank files' local tensors make, with one chunk per piece of bytes."""
    tp = max(r.tp for r in ranks) + 1
    ep = max(r.ep for r in ranks) + 1
    starts = stage_layers(args, max(r.pp for r in ranks) + 1, where)
    experts = _int(args, "num_experts", None)
    e_local = experts // ep if experts else None
    etp = _int(args, "expert_tensor_parallel_size", None) or tp
    if experts and (experts % ep or etp != tp):  # ETP ≠ TP changes which files hold which expert shards
        raise MegatronLoadError(f"{where}: {experts} experts over EP={ep} with expert TP={etp} (TP={tp}): "
                                "not a layout this reader knows; save it as torch_dist instead")
    swiglu = bool(args.get("swiglu") or args.get("gated_linear_unit"))
    tied = not args.get("untie_embeddings_and_output_weights", False)
    local_spec = args.get("transformer_impl", "local") == "local"
    # global key → [(layer, expert, tp rank, local tensor, split)]
    parts: dict[str, list[tuple[int | None, int | None, int, LocalTensor, int | None]]] = {}
    seen: dict[tuple[str, int | None, int | None, int], LocalTensor] = {}
    for rf, tensors in sorted(ranks.items(), key=lambda kv: kv[0].name):
        for key, lt in tensors.items():
            if key == "output_layer.weight" and tied:
                continue  # the last stage's copy of the tied embedding: torch_dist saves it once
            gkey, layer, expert, tail = _global_key(key, local_spec)
            split = _split(tail, key, where)
            glayer = None if layer is None else starts[rf.pp] + layer
            if glayer is not None and glayer >= starts[rf.pp + 1]:
                raise MegatronLoadError(f"{where}/{rf.name}: tensor {key!r}: stage {rf.pp} holds layers "
                                        f"{starts[rf.pp]}..{starts[rf.pp + 1] - 1}, not local layer {layer}")
            if expert is not None:
                if e_local is None or expert >= e_local:
                    raise MegatronLoadError(f"{where}/{rf.name}: tensor {key!r}: expert {expert} but the arguments "
                                            f"say {e_local} local experts per EP rank")
                expert = rf.ep * e_local + expert
            elif rf.ep:
                continue  # non-expert tensors are replicated over EP ranks: EP rank 0's copy is read
            tp_rank = rf.tp if split is not REPLICATED else 0
            slot = (gkey, glayer, expert, rf.tp)
            if slot in seen:
                raise MegatronLoadError(f"{where}/{rf.name}: tensor {key!r} is saved twice for one place")
            seen[slot] = lt
            if split is REPLICATED and rf.tp:
                first = seen.get((gkey, glayer, expert, 0))
                if first is not None and (first.shape, first.dtype) != (lt.shape, lt.dtype):
                    raise MegatronLoadError(f"{where}/{rf.name}: tensor {key!r}: replicated over TP ranks but "
                                            f"{lt.shape} here, {first.shape} on rank 0")
                continue
            parts.setdefault(gkey, []).append((glayer, expert, tp_rank, lt, split))
    out = {}
    for gkey, items in parts.items():
        out[gkey] = _join(gkey, items, tp, starts[-1], experts, swiglu and "linear_fc1." in gkey, where)
    return out


def _join(gkey: str, items: list, tp: int, layers: int, experts: int | None, gated: bool,
          where: str) -> GlobalTensor:
    shapes = {(lt.shape, lt.dtype) for *_, lt, _ in items}
    if len(shapes) != 1:
        raise MegatronLoadError(f"{where}: tensor {gkey!r}: its pieces differ in shape or dtype "
                                f"({sorted(shapes)[:3]}); cannot be stacked")
    (local, dtype), = shapes
    layer0, expert0, _, _, split = items[0]
    lead = (() if layer0 is None else (layers,)) + (() if expert0 is None else (experts or 0,))
    ways = tp if split is not REPLICATED else 1
    shape = list(local)
    if split is not REPLICATED:
        if split >= len(local):
            raise MegatronLoadError(f"{where}: tensor {gkey!r} of local shape {list(local)} has no dim {split} to "
                                    "join tensor-parallel shards on")
        shape[split] *= ways
    chunks = []
    for layer, expert, rank, lt, _ in items:
        base = tuple(x for x in (layer, expert) if x is not None)
        ones = (1,) * len(base)
        if split is REPLICATED:
            chunks.append(ChunkRef(lt.file, lt.byte_offset, lt.byte_length, base + (0,) * len(local), ones + local))
        elif gated and split == COLUMN:  # [gate_r; up_r] → rows r·h of the gate half and of the up half
            if local[0] % 2:
                raise MegatronLoadError(f"{where}: tensor {gkey!r}: SwiGLU rows {local[0]} are not even")
            h, half = local[0] // 2, lt.byte_length // 2
            rest = (0,) * (len(local) - 1)
            for i, row in enumerate((rank * h, tp * h + rank * h)):
                chunks.append(ChunkRef(lt.file, lt.byte_offset + i * half, half, base + (row, *rest),
                                       ones + (h, *local[1:])))
        else:
            off = [0] * len(local)
            off[split] = rank * local[split]
            chunks.append(ChunkRef(lt.file, lt.byte_offset, lt.byte_length, base + tuple(off), ones + local))
    return GlobalTensor(gkey, dtype, lead + tuple(shape), tuple(chunks))

"""Megatron-LM GPT-2 → Hugging Face GPT-2: apply the mapping table, merge TP ranks, build config.

Pure torch, no I/O: takes a `MegatronCheckpoint` (see `megatron_load`) and returns the GPT-2
state dict and config dict. What maps to what is data (the Megatron table,
`ckptflow.tasks.presets.megatron`); this module only knows the transforms the table can name:
TP merge (COLUMN / ROW / REPLICATED), the `checkpoint_version`-dependent QKV reorder,
vocab-padding cut and the [out,in]→[in,out] transpose.
Every step is a copy or a permutation, so the output is bit-identical to the source weights.
"""
from __future__ import annotations

from typing import Any

import torch

from ckptflow.tasks.megatron.load import MegatronCheckpoint, megatron_arg
from ckptflow.tasks.megatron.shapes import MegatronConvertError, Routing, check_kinds, check_shapes
from ckptflow.tasks.presets.megatron import MegatronRule, MegatronTable, load_megatron_table

GPT2_BPE_VOCAB = 50257
INT_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
MAX_NESTING = 16  # Megatron's state dicts nest 4 deep (language_model.encoder.layers...)


def flatten(tree: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Megatron's nested state dict ({'language_model': {'embedding': {...}}}) → dotted names."""
    if depth > MAX_NESTING:
        raise MegatronConvertError(f"model.{prefix}..: nested more than {MAX_NESTING} dicts deep; "
                                   "not a Megatron-LM state dict")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + ".", depth + 1))
        else:
            out[name] = value
    return out


def qkv_split_major(t: torch.Tensor, version: float, heads: int, head_dim: int, name: str) -> torch.Tensor:
    """One rank's fused QKV rows in `version`'s saved layout → [3, heads, head_dim, *rest].

    0: saved [3, heads, hd] already; 1.0: saved [heads, hd, 3]; >= 2.0: saved [heads, 3, hd]
    (the reference converter's fix_query_key_value_ordering, applied to one rank's heads).
    """
    if t.shape[0] != 3 * heads * head_dim:
        raise MegatronConvertError(f"{name}: {t.shape[0]} rows, expected 3 * {heads} heads * {head_dim} "
                                   "head dim; n_head / n_embd in the config do not fit this checkpoint")
    rest = tuple(t.shape[1:])
    tail = tuple(range(3, 3 + len(rest)))
    if version == 0:
        return t.reshape(3, heads, head_dim, *rest)
    if version == 1.0:
        return t.reshape(heads, head_dim, 3, *rest).permute(2, 0, 1, *tail)
    if version >= 2.0:
        return t.reshape(heads, 3, head_dim, *rest).permute(1, 0, 2, *tail)
    raise MegatronConvertError(f"{name}: checkpoint_version {version} is unknown (known: 0, 1.0, >= 2.0)")


def _merge(name: str, rule: MegatronRule, parts: list[torch.Tensor], version: float, heads: int,
           head_dim: int, check_replicated: bool) -> torch.Tensor:
    if rule.qkv:  # each rank holds heads/TP whole heads: reorder per rank, then merge head-wise
        split = [qkv_split_major(p, version, heads // len(parts), head_dim, name) for p in parts]
        t = split[0] if len(split) == 1 else torch.cat(split, dim=1)
        return t.reshape(3 * heads * head_dim, *t.shape[3:])
    if rule.tp == "REPLICATED":
        for rank, p in enumerate(parts[1:], start=1):
            if check_replicated and (p.shape != parts[0].shape or not torch.equal(p, parts[0])):
                raise MegatronConvertError(f"{name}: replicated, yet rank {rank} differs from rank 0; "
                                           "the rank files come from different runs or iterations")
        return parts[0]
    dim = 0 if rule.tp == "COLUMN" else 1
    if parts[0].dim() <= dim:
        raise MegatronConvertError(f"{name}: {rule.tp} split needs dim {dim}; its shape is "
                                   f"{list(parts[0].shape)}")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _map_names(flats: list[dict[str, Any]], table: MegatronTable, where: str) -> Routing:
    """Every flattened name → (rule, target, layer); unknown names are collected and reported together."""
    names = list(flats[0])
    for rank, flat in enumerate(flats[1:], start=1):
        if set(flat) != set(names):
            diff = sorted(set(flat) ^ set(names))
            raise MegatronConvertError(f"{where}: rank {rank} and rank 0 hold different tensors "
                                       f"({', '.join(diff[:8])}); the ranks come from different models")
    mapped: dict[str, tuple[MegatronRule, str | None, int | None]] = {}
    unknown: list[str] = []
    for name in names:
        hit = table.match(name)
        if hit is None:
            unknown.append(name)
            continue
        if not isinstance(flats[0][name], torch.Tensor):
            raise MegatronConvertError(f"{where}: model.{name} is a {type(flats[0][name]).__name__}, "
                                       "not a tensor")
        mapped[name] = hit
    if unknown:
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise MegatronConvertError(f"{where}: {len(unknown)} tensor(s) match no rule of {table.label}: "
                                   f"{', '.join('model.' + n for n in unknown[:20])}{more}. Not a Megatron "
                                   "GPT-2 checkpoint, or one that needs a table of its own (pass one with "
                                   "--table FILE|URL)")
    return mapped


def gpt2_config(args: Any, table: MegatronTable, override: dict[str, Any] | None,
                tensors: dict[str, list[torch.Tensor]], n_layers: int, tp: int, where: str) -> dict[str, Any]:
    """GPT-2 config: table defaults < Megatron args < `override`, then checked against the tensors."""
    cfg, origin = dict(table.config_defaults), {k: "defaults for NVIDIA's 345M release" for k in table.config_defaults}
    if args is not None:
        for key, bad in table.unsupported_args.items():
            if (value := megatron_arg(args, key)) is not None and value in bad:
                raise MegatronConvertError(f"{where}: args.{key}={value!r}: GPT-2 has no such variant, "
                                           "so the converted model would compute something else")
        for key, attr in table.config_from_args.items():
            if (value := megatron_arg(args, attr)) is not None:
                cfg[key], origin[key] = value, f"args.{attr}"
        # The reference converter's rule: Megatron's fused bias-GeLU is the tanh approximation.
        cfg["activation_function"] = ("gelu_fast" if megatron_arg(args, "bias_gelu_fusion") else
                                      "gelu_new" if megatron_arg(args, "openai_gelu") else "gelu")
        origin["activation_function"] = "args.bias_gelu_fusion / args.openai_gelu"
        # args hold only padded_vocab_size; the true size is the tokenizer's (GPT-2 BPE: 50257).
        tokenizer = megatron_arg(args, "tokenizer_type")
        if tokenizer not in (None, "GPT2BPETokenizer") and tensors.get("transformer.wte.weight"):
            cfg["vocab_size"] = sum(p.shape[0] for p in tensors["transformer.wte.weight"])
            origin["vocab_size"] = (f"all embedding rows: tokenizer {tokenizer}'s size is unknown here; "
                                    "pass vocab_size in a --config FILE to drop the padding")
        elif "vocab_size" in cfg:
            cfg["vocab_size"], origin["vocab_size"] = GPT2_BPE_VOCAB, "the GPT-2 BPE tokenizer"
    for key, value in (override or {}).items():
        cfg[key], origin[key] = value, "--config"
    # Unset, null (GPT-2's own meaning) or from the 345M defaults: 4h, as Megatron before ffn_hidden_size.
    if (cfg.get("n_inner") is None or origin.get("n_inner", "").startswith("defaults")) \
            and isinstance(cfg.get("n_embd"), int):
        cfg["n_inner"], origin["n_inner"] = 4 * cfg["n_embd"], "4 * n_embd"
    for key in INT_KEYS:
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise MegatronConvertError(f"{where}: config {key}={cfg.get(key)!r} (from "
                                       f"{origin.get(key, 'nowhere')}) must be a positive integer")

    def check(ok: bool, key: str, has: str) -> None:
        if not ok:
            raise MegatronConvertError(f"{where}: config {key}={cfg[key]} (from {origin[key]}) does not fit "
                                       f"the checkpoint, which has {has}; set {key} in a JSON file passed "
                                       "with --config FILE")
    check(cfg["n_layer"] == n_layers, "n_layer", f"{n_layers} layers")
    check(cfg["n_embd"] % cfg["n_head"] == 0, "n_head", f"hidden size {cfg['n_embd']}")
    check(cfg["n_head"] % tp == 0, "n_head", f"{tp} tensor-parallel ranks, each holding whole heads")
    if wte := tensors.get("transformer.wte.weight"):
        rows = sum(p.shape[0] for p in wte)
        check(cfg["n_embd"] == wte[0].shape[1], "n_embd", f"hidden size {wte[0].shape[1]}")
        check(cfg["vocab_size"] <= rows, "vocab_size", f"{rows} embedding rows")
        padded = megatron_arg(args, "padded_vocab_size")
        if isinstance(padded, int) and padded != rows:
            raise MegatronConvertError(f"{where}: args.padded_vocab_size={padded} but the word embeddings "
                                       f"of all ranks have {rows} rows; a rank file is missing or foreign")
        cfg["torch_dtype"] = str(wte[0].dtype).removeprefix("torch.")
    if wpe := tensors.get("transformer.wpe.weight"):
        check(cfg["n_positions"] == wpe[0].shape[0], "n_positions", f"{wpe[0].shape[0]} position embeddings")
    if fc := tensors.get("transformer.h.0.mlp.c_fc.weight"):
        check(cfg["n_inner"] == sum(p.shape[0] for p in fc), "n_inner",
              f"an MLP of {sum(p.shape[0] for p in fc)}")
    for key in ("bos_token_id", "eos_token_id"):  # 50256 is GPT-2 BPE's; out of range it only warns
        if origin.get(key, "").startswith("defaults") and isinstance(cfg.get(key), int) \
                and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = None
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2",
               tie_word_embeddings="lm_head.weight" not in tensors)
    return cfg


def convert_megatron(ck: MegatronCheckpoint, config_override: dict[str, Any] | None = None,
                     table: MegatronTable | None = None, check_replicated: bool = True,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(GPT-2 state dict of contiguous tensors in the source dtype, GPT-2 config.json dict)."""
    table = table or load_megatron_table()
    where = ck.source_files[0] + (f" (+{ck.tp_size - 1} more ranks)" if ck.tp_size > 1 else "")
    flats = [flatten(r["model"]) for r in ck.ranks]
    mapped = _map_names(flats, table, where)
    by_target: dict[str, list[torch.Tensor]] = {}
    for name, (rule, target, _) in mapped.items():
        if target is not None:
            if target in by_target:
                raise MegatronConvertError(f"{where}: two tensors map to {target} (one is model.{name}); "
                                           "the checkpoint mixes key layouts")
            by_target[target] = [f[name] for f in flats]
    # Count layers from the names (the reference converter trusted a leaked loop variable).
    layers = sorted({layer for _, _, layer in mapped.values() if layer is not None})
    if layers != list(range(len(layers))):
        raise MegatronConvertError(f"{where}: layer numbers {layers} are not 0..N-1; layers are missing")
    expected = {r.target.format(layer=i) for r in table.rules if r.target and not r.optional
                for i in (layers if "{layer}" in r.target else [None])}
    if missing := sorted(expected - set(by_target)):
        raise MegatronConvertError(f"{where}: GPT-2 needs {', '.join(missing)}, which the checkpoint lacks")
    check_kinds(mapped, by_target, where)
    config = gpt2_config(ck.args, table, config_override, by_target, len(layers), ck.tp_size, where)
    check_shapes(mapped, by_target, config, ck.tp_size, where)  # before any tensor is merged or copied
    heads, head_dim = config["n_head"], config["n_embd"] // config["n_head"]
    state: dict[str, torch.Tensor] = {}
    for name, (rule, target, _) in mapped.items():
        if target is None:
            continue
        t = _merge(f"model.{name}", rule, by_target[target], float(ck.checkpoint_version), heads,
                   head_dim, check_replicated)
        if rule.vocab:
            t = t[: config["vocab_size"]]
        if rule.transpose:
            t = t.transpose(0, 1)
        state[target] = t.contiguous()
    return state, config


__all__ = ["MegatronConvertError", "convert_megatron", "flatten", "gpt2_config", "qkv_split_major"]

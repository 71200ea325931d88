"""config.json for a Megatron-Core checkpoint: the table's defaults < the saved args < `--config`.

Which config key comes from which args name is the table's (`config_from_args`); here only what is
Megatron's own semantics, whatever the family: a model without group_query_attention has as many
KV heads as query heads, head_dim defaults to hidden / heads, the true vocabulary size (never the
padded one) and whether the output layer is tied. A key no source gives is an error that names
the args it was looked for under and says to pass it in `--config FILE`.
"""
from __future__ import annotations

from typing import Any

from ckptflow.tasks.mcore.index import McoreIndex
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.presets.mcore import McoreTable

ST_TO_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "intermediate_size")


def _from_args(args: dict[str, Any], spec: str | tuple[str, ...]) -> tuple[Any, str | None]:
    """(value, 'args.<name>') of the first args name in `spec` that is set; '!name' negates."""
    for name in (spec,) if isinstance(spec, str) else spec:
        neg = name.startswith("!")
        value = args.get(name.lstrip("!"))
        if value is not None:
            return (not value if neg else value), f"args.{name}"
    return None, None


def hf_config(index: McoreIndex, table: McoreTable, override: dict[str, Any] | None = None,
              tokenizer_vocab: int | None = None) -> dict[str, Any]:
    """The HF config.json for `index` under `table`; raises a PlanError naming what is missing."""
    args, where = index.args, index.root
    for name, bad in table.unsupported_args.items():
        if (value := args.get(name)) is not None and value in bad:
            raise PlanError(f"{where}: args.{name}={value!r}: {table.label} ({table.model_type}) has no such "
                            "variant, so the converted model would compute something else")
    cfg, origin = dict(table.config_defaults), {k: "the table's defaults" for k in table.config_defaults}
    looked: dict[str, str] = {}
    for key, spec in table.config_from_args.items():
        value, src = _from_args(args, spec)
        looked[key] = " / ".join(f"args.{s}" for s in ((spec,) if isinstance(spec, str) else spec))
        if value is not None:
            cfg[key], origin[key] = value, src or ""
    # Megatron semantics: MHA has a KV head per query head; kv_channels defaults to hidden / heads.
    if "num_key_value_heads" in table.config_from_args and (
            args.get("group_query_attention") is False or cfg.get("num_key_value_heads") is None):
        cfg["num_key_value_heads"] = cfg.get("num_attention_heads")
        origin["num_key_value_heads"] = "args.num_attention_heads (no group_query_attention)"
    if cfg.get("head_dim") is None and isinstance(cfg.get("hidden_size"), int) \
            and isinstance(cfg.get("num_attention_heads"), int) and cfg["num_attention_heads"] > 0:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        origin["head_dim"] = "hidden_size / num_attention_heads"
    # The true vocab: args.vocab_size is None when training used a Hugging Face tokenizer.
    if args.get("vocab_size") is not None:
        cfg["vocab_size"], origin["vocab_size"] = args["vocab_size"], "args.vocab_size"
    elif tokenizer_vocab is not None:
        cfg["vocab_size"], origin["vocab_size"] = tokenizer_vocab, "--tokenizer"
    # MoE layer pattern: a list moe_layer_freq that is dense first, MoE after is DeepSeek's first_k_dense_replace.
    freq = args.get("moe_layer_freq")
    if "first_k_dense_replace" in cfg and isinstance(freq, list) and freq and 1 in freq:
        k = freq.index(1)
        if any(x != 1 for x in freq[k:]):
            raise PlanError(f"{where}: args.moe_layer_freq={freq}: {table.label} needs dense layers first, then MoE "
                            "layers only (first_k_dense_replace)")
        cfg["first_k_dense_replace"], origin["first_k_dense_replace"] = k, "args.moe_layer_freq"
    untie = args.get("untie_embeddings_and_output_weights")
    cfg["tie_word_embeddings"] = (not untie) if untie is not None else OUTPUT not in index.tensors
    for key, value in (override or {}).items():
        cfg[key], origin[key] = value, "--config"
    if cfg.get("vocab_size") is None:
        raise PlanError(f"{where}: the true vocabulary size is unknown: args.vocab_size is not saved (training "
                        "used a Hugging Face tokenizer?); pass --tokenizer DIR (its tokenizer.json) or --config FILE "
                        "with vocab_size. The padded rows are never written")
    missing = [k for k in table.config_from_args if cfg.get(k) is None]
    if missing:
        raise PlanError(f"{where}: config.json needs {', '.join(missing)}, which the checkpoint's args do not "
                        f"hold ({'; '.join(f'{k} from {looked[k]}' for k in missing)}); pass them in --config FILE")
    for key in INT_KEYS:
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0):
            raise PlanError(f"{where}: config {key}={cfg[key]!r} (from {origin.get(key, '?')}) must be a positive "
                            "integer")
    if cfg["tie_word_embeddings"] and OUTPUT in index.tensors and untie is None and "tie_word_embeddings" \
            not in (override or {}):
        cfg["tie_word_embeddings"] = False  # an output layer saved beside the embedding is its own
    emb = index.tensors.get(EMBEDDING)
    if emb is not None:
        if len(emb.shape) != 2 or emb.shape[1] != cfg["hidden_size"]:
            raise PlanError(f"{EMBEDDING}: shape {list(emb.shape)}, but hidden_size={cfg['hidden_size']} "
                            f"(from {origin.get('hidden_size')})")
        cfg["torch_dtype"] = ST_TO_CONFIG_DTYPE.get(emb.dtype, emb.dtype.lower())
    cfg.update(model_type=table.model_type, architectures=list(table.architectures))
    return cfg


def tokenizer_vocab_size(doc: Any) -> int | None:
    """len(tokenizer) from a tokenizer.json document: the highest id of the model's vocab and the
    added tokens, plus one; None when the document has neither."""
    if not isinstance(doc, dict):
        return None
    ids: list[int] = []
    vocab = (doc.get("model") or {}).get("vocab") if isinstance(doc.get("model"), dict) else None
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids.append(len(vocab) - 1)
    ids += [t["id"] for t in doc.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return max(ids) + 1 if ids else None

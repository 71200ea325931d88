"""Hand-made Megatron-Core checkpoints for the mapping tests: an HF model's weights laid out as
torch_dist global tensors (stacked layers, grouped QKV, [gate; up], padded vocab), cut into TP
chunks and written as raw bytes at known offsets (junk between chunks), with the `McoreIndex` a
reader would give. So the mapping, planner and assembler run on real bytes before the
megatron-core fixtures exist; those then check the layout assumptions against Megatron itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ckptflow.tasks.kernels.dtype_map import TORCH_TO_ST
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor, McoreIndex


def grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v_proj rows → Megatron's linear_qkv rows: per group [its q heads, k, v]."""
    qs, ks, vs = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    return torch.cat([torch.cat([a, b, c]) for a, b, c in zip(qs, ks, vs)])


def mcore_globals(sd: dict[str, torch.Tensor], cfg: Any, padded_vocab: int, moe: bool = False,
                  qk_norm: bool = False, bias: bool = False) -> dict[str, torch.Tensor]:
    """The torch_dist global tensors of an HF Llama/Qwen state dict (experts [L, E, ...] when `moe`)."""
    L, G = cfg.num_hidden_layers, cfg.num_key_value_heads
    g = torch.Generator().manual_seed(7)

    def pad(t: torch.Tensor) -> torch.Tensor:  # Megatron's vocab padding: rows that must never be written
        extra = torch.randn(padded_vocab - t.shape[0], *t.shape[1:], generator=g).to(t.dtype)
        return torch.cat([t, extra])

    def stack(fmt: str) -> torch.Tensor:
        return torch.stack([sd[fmt.format(i)] for i in range(L)])

    p = "model.layers.{}."
    out = {"embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": sd["model.norm.weight"],
           "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(p + "input_layernorm.weight"),
           "decoder.layers.self_attention.linear_proj.weight": stack(p + "self_attn.o_proj.weight")}
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    for suffix in ("weight",) + (("bias",) if bias else ()):
        out[f"decoder.layers.self_attention.linear_qkv.{suffix}"] = torch.stack([grouped_qkv(
            *(sd[f"model.layers.{i}.self_attn.{x}_proj.{suffix}"] for x in "qkv"), G) for i in range(L)])
    if qk_norm:
        out["decoder.layers.self_attention.q_layernorm.weight"] = stack(p + "self_attn.q_norm.weight")
        out["decoder.layers.self_attention.k_layernorm.weight"] = stack(p + "self_attn.k_norm.weight")
    if moe:
        E = cfg.num_experts
        out["decoder.layers.pre_mlp_layernorm.weight"] = stack(p + "post_attention_layernorm.weight")
        out["decoder.layers.mlp.router.weight"] = stack(p + "mlp.gate.weight")
        e = "model.layers.{}.mlp.experts.{}."
        out["decoder.layers.mlp.experts.experts.linear_fc1.weight"] = torch.stack([torch.stack([torch.cat(
            [sd[e.format(i, x) + "gate_proj.weight"], sd[e.format(i, x) + "up_proj.weight"]]) for x in range(E)])
            for i in range(L)])
        out["decoder.layers.mlp.experts.experts.linear_fc2.weight"] = torch.stack([torch.stack(
            [sd[e.format(i, x) + "down_proj.weight"] for x in range(E)]) for i in range(L)])
    else:
        out["decoder.layers.mlp.linear_fc1.layer_norm_weight"] = stack(p + "post_attention_layernorm.weight")
        out["decoder.layers.mlp.linear_fc1.weight"] = torch.stack([torch.cat(
            [sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]])
            for i in range(L)])
        out["decoder.layers.mlp.linear_fc2.weight"] = stack(p + "mlp.down_proj.weight")
    return out


ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")  # TP splits their input (last) dim


def tp_boxes(key: str, shape: tuple[int, ...], tp: int, lead: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of each chunk: one per leading index and TP rank (column-parallel split the
    row dim, row-parallel the last dim; [gate; up] is cut in 2*TP so each rank's halves are apart)."""
    if "norm" in key or key.endswith("router.weight"):
        dim, parts = None, 1
    elif key.endswith(ROW_PARALLEL):
        dim, parts = len(shape) - 1, tp
    else:
        dim, parts = lead, tp * (2 if "linear_fc1" in key else 1)
    boxes = []
    leads = [()]
    for d in range(lead):
        leads = [x + (i,) for x in leads for i in range(shape[d])]
    for idx in leads:
        for r in range(parts):
            off = list(idx) + [0] * (len(shape) - lead)
            size = [1] * lead + list(shape[lead:])
            if dim is not None:
                step = shape[dim] // parts
                off[dim], size[dim] = r * step, step
            boxes.append((tuple(off), tuple(size)))
    return boxes


def write_mcore(root: Path, globals_: dict[str, torch.Tensor], args: dict[str, Any], tp: int = 2,
                stacked: dict[str, int] | None = None) -> McoreIndex:
    """Write the chunks into `tp` files (rank r's chunks in `__r_0.distcp`, 64 junk bytes before
    each) and return the index; `stacked[key]` = its number of leading index axes (default: 1 for
    decoder.layers.*, 2 for experts, 0 else)."""
    root.mkdir(parents=True, exist_ok=True)
    files = [bytearray() for _ in range(tp)]
    tensors = {}
    for key, t in globals_.items():
        lead = (stacked or {}).get(key, 2 if ".experts.experts." in key else 1 if key.startswith("decoder.layers.")
                                   else 0)
        chunks = []
        for k, (off, size) in enumerate(tp_boxes(key, tuple(t.shape), tp, lead)):
            part = t[tuple(slice(o, o + s) for o, s in zip(off, size))].contiguous()
            raw = part.view(torch.uint8).numpy().tobytes() if part.numel() else b""
            f = k % tp
            files[f] += b"\xa5" * 64  # junk: a wrong offset reads it
            chunks.append(ChunkRef(f"__{f}_0.distcp", len(files[f]), len(raw), off, size))
            files[f] += raw
        tensors[key] = GlobalTensor(key, TORCH_TO_ST[t.dtype], tuple(t.shape), tuple(chunks))
    for r, data in enumerate(files):
        (root / f"__{r}_0.distcp").write_bytes(bytes(data))
    return McoreIndex(str(root), "torch_dist", 10, args, tp, 1, 1, tensors)


def llama_args(cfg: Any, padded_vocab: int, vocab: int | None, **extra: Any) -> dict[str, Any]:
    """Megatron-LM args for an HF config, as common.pt holds them."""
    args = {"hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "group_query_attention": True,
            "num_query_groups": cfg.num_key_value_heads, "kv_channels": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "norm_epsilon": cfg.rms_norm_eps,
            "rotary_base": (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000),
            "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
            "position_embedding_type": "rope", "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
            "vocab_size": vocab, "padded_vocab_size": padded_vocab, "init_method_std": 0.02}
    args.update(extra)
    return args

"""Seed 001's renaming, re-expressed: the reference both the MP bench baseline and tests use.

Chained substring renames, then a lookup on the second-to-last name part (its table gives the
new part and the split dim) — the seed's rules, kept apart from ckptflow's preset tables so the
two can check each other.
"""
from __future__ import annotations

SEED_RENAMES = (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"),
                ("e_score_correction_bias", "bias"))
SEED_MAPPING = {  # second-to-last name part → (new part, split dim)
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1),
    "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
    "norm": ("norm", None), "lm_head": ("head", 0), "scale": ("scale", None),
}


def seed_rename(name: str) -> tuple[str, int | None]:
    """HF name → (inference name, split dim or None), exactly as the seed derives them."""
    new = name[len("model."):] if name.startswith("model.") else name
    for a, b in SEED_RENAMES:
        new = new.replace(a, b)
    key = new.split(".")[-2]
    target, dim = SEED_MAPPING[key]
    return new.replace(key, target), dim


def is_routed_expert(name: str) -> bool:
    return "experts" in name and "shared_experts" not in name


def seed_rank_state_dicts(src: str, world: int) -> list[dict]:
    """Seed 001's algorithm and memory profile: every rank's whole state dict in memory.

    MTP layers come from config.json (the seed hard-codes "model.layers.61").
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    config = json.loads((Path(src) / "config.json").read_text())
    first = config["num_hidden_layers"]
    mtp = tuple(f"model.layers.{first + k}." for k in range(config.get("num_nextn_predict_layers", 0)))
    n_local = config["n_routed_experts"] // world
    ranks: list[dict] = [{} for _ in range(world)]
    for file in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(mtp):
                    continue
                param = f.get_tensor(name)
                new, dim = seed_rename(name)
                for r in range(world):
                    if is_routed_expert(new):
                        if int(new.split(".")[-3]) // n_local == r:
                            ranks[r][new] = param
                    elif dim is None:
                        ranks[r][new] = param
                    else:
                        step = param.size(dim) // world
                        ranks[r][new] = param.narrow(dim, r * step, step).contiguous()
    return ranks

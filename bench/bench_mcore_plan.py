"""Megatron-Core → HF planning at scale, from an index alone (no files): a Qwen3-235B-A22B-shaped
model (94 layers, 128 experts, TP=4, each expert's [gate; up] in 2 chunks) = 37k chunks, 37k HF
tensors, 470 GB of bf16. Prints planning time and peak RSS (measured: 5.0 s, 118 MB on the 2-core
dev box). Reading `.metadata` is the reader's part and not counted here.
Usage: .venv/bin/python bench/bench_mcore_plan.py
"""
from __future__ import annotations

import itertools
import math
import resource
import time

from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor, McoreIndex
from ckptflow.tasks.mcore.plan import plan_mcore
from ckptflow.tasks.presets.mcore import pick_table

L, E, H, F, MF, V, VP, HEADS, G, HD, TP, EP = 94, 128, 4096, 12288, 1536, 151936, 152064, 64, 4, 128, 4, 8
D = "decoder.layers."


def tensor(key: str, shape: tuple[int, ...], lead: int, split_dim: int | None = None, parts: int = 1) -> GlobalTensor:
    """One chunk per stacked index and part (`split_dim` cut in `parts`), at made-up offsets."""
    chunks, off = [], 0
    for idx in itertools.product(*(range(s) for s in shape[:lead])):
        for r in range(parts):
            o = list(idx) + [0] * (len(shape) - lead)
            s = [1] * lead + list(shape[lead:])
            if split_dim is not None:
                step = shape[split_dim] // parts
                o[split_dim], s[split_dim] = r * step, step
            n = 2 * math.prod(s)
            chunks.append(ChunkRef(f"__{r}_{idx[0] if idx else 0}.distcp", off, n, tuple(o), tuple(s)))
            off += n
    return GlobalTensor(key, "BF16", shape, tuple(chunks))


def main() -> None:
    specs = {
        "embedding.word_embeddings.weight": ((VP, H), 0, 0, TP),
        "output_layer.weight": ((VP, H), 0, 0, TP),
        "decoder.final_layernorm.weight": ((H,), 0, None, 1),
        D + "self_attention.linear_qkv.weight": ((L, (HEADS + 2 * G) * HD, H), 1, 1, TP),
        D + "self_attention.linear_qkv.layer_norm_weight": ((L, H), 1, None, 1),
        D + "self_attention.q_layernorm.weight": ((L, HD), 1, None, 1),
        D + "self_attention.k_layernorm.weight": ((L, HD), 1, None, 1),
        D + "self_attention.linear_proj.weight": ((L, H, HEADS * HD), 1, 2, TP),
        D + "mlp.linear_fc1.layer_norm_weight": ((L, H), 1, None, 1),
        D + "mlp.router.weight": ((L, E, H), 1, None, 1),
        D + "mlp.experts.experts.linear_fc1.weight": ((L, E, 2 * MF, H), 2, 2, 2),
        D + "mlp.experts.experts.linear_fc2.weight": ((L, E, H, MF), 2, None, 1),
    }
    tensors = {k: tensor(k, *v) for k, v in specs.items()}
    args = dict(hidden_size=H, ffn_hidden_size=F, num_layers=L, num_attention_heads=HEADS, group_query_attention=True,
                num_query_groups=G, kv_channels=HD, max_position_embeddings=40960, norm_epsilon=1e-6,
                rotary_base=1e6, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                untie_embeddings_and_output_weights=True, vocab_size=V, num_experts=E, qk_layernorm=True,
                moe_ffn_hidden_size=MF, moe_router_topk=8)
    index = McoreIndex("/nowhere", "torch_dist", 1, args, TP, 1, EP, tensors)
    n_chunks = sum(len(t.chunks) for t in tensors.values())
    print(f"index: {n_chunks} chunks, {sum(c.byte_length for t in tensors.values() for c in t.chunks) / 1e9:.1f} GB")
    t0 = time.perf_counter()
    mp = plan_mcore(index, pick_table(args), 5 * 10**9)
    print(f"plan: {time.perf_counter() - t0:.2f} s, {mp.tensors} HF tensors, {len(mp.plan.shards)} shards, "
          f"{mp.plan.total_size / 1e9:.1f} GB out, reads {mp.plan.source_bytes / 1e9:.1f} GB")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

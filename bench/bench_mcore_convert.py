"""Megatron-Core → HF conversion of a generated torch_dist-layout checkpoint: peak RSS vs size.

Writes a Llama-shaped model (hidden 4096, GQA 32/8 heads, ffn 11008, vocab 32000 padded to 32256,
bf16) as TP=2 chunks of random bytes at known offsets (the layout `read_mcore_index` reports; this
bench starts from the index, so it measures planning + assembly, not the reader), converts it with
the engine (serial, no Prefect) and prints seconds and peak RSS (VmHWM). Run with 2 and with 6
layers to see RSS stay flat while the model grows.
Usage: .venv/bin/python bench/bench_mcore_convert.py DIR [LAYERS]
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor, McoreIndex
from ckptflow.tasks.mcore.plan import plan_mcore, source_checkpoint
from ckptflow.tasks.presets.mcore import pick_table
from ckptflow.tasks.run.engine import EnginePass, run_conversion

H, HEADS, G, HD, F, V, VP, TP = 4096, 32, 8, 128, 11008, 32000, 32256, 2
D = "decoder.layers."
BLOCK = 8 << 20


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def write_chunks(root: Path, key: str, shape: tuple[int, ...], lead: int, dim: int | None, parts: int,
                 files: list) -> GlobalTensor:
    chunks = []
    for idx in range(shape[0]) if lead else [None]:
        for r in range(parts):
            o = ([idx] if lead else []) + [0] * (len(shape) - lead)
            s = ([1] if lead else []) + list(shape[lead:])
            if dim is not None:
                o[dim], s[dim] = r * (shape[dim] // parts), shape[dim] // parts
            n, f = 2 * math.prod(s), files[r]
            start = f.tell()
            for a in range(0, n, BLOCK):  # random bytes, a block at a time: the writer stays small too
                f.write(os.urandom(min(BLOCK, n - a)))
            chunks.append(ChunkRef(Path(f.name).name, start, n, tuple(o), tuple(s)))
    return GlobalTensor(key, "BF16", shape, tuple(chunks))


def main(root: Path, layers: int) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "src").mkdir(parents=True)
    specs = {
        "embedding.word_embeddings.weight": ((VP, H), 0, 0, TP),
        "output_layer.weight": ((VP, H), 0, 0, TP),
        "decoder.final_layernorm.weight": ((H,), 0, None, 1),
        D + "self_attention.linear_qkv.layer_norm_weight": ((layers, H), 1, None, 1),
        D + "self_attention.linear_qkv.weight": ((layers, (HEADS + 2 * G) * HD, H), 1, 1, TP),
        D + "self_attention.linear_proj.weight": ((layers, H, HEADS * HD), 1, 2, TP),
        D + "mlp.linear_fc1.layer_norm_weight": ((layers, H), 1, None, 1),
        D + "mlp.linear_fc1.weight": ((layers, 2 * F, H), 1, 1, 2 * TP),
        D + "mlp.linear_fc2.weight": ((layers, H, F), 1, 2, TP),
    }
    files = [open(root / "src" / f"__{r}_0.distcp", "wb") for r in range(2 * TP)]
    tensors = {k: write_chunks(root, k, *v, files) for k, v in specs.items()}
    for f in files:
        f.close()
    args = dict(hidden_size=H, ffn_hidden_size=F, num_layers=layers, num_attention_heads=HEADS,
                group_query_attention=True, num_query_groups=G, kv_channels=HD, max_position_embeddings=4096,
                norm_epsilon=1e-5, rotary_base=10000, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                untie_embeddings_and_output_weights=True, vocab_size=V)
    index = McoreIndex(str(root / "src"), "torch_dist", 1, args, TP, 1, 1, tensors)
    size = sum(c.byte_length for t in tensors.values() for c in t.chunks)
    before = vm_hwm()
    t0 = time.perf_counter()
    mp = plan_mcore(index, pick_table(args), 2 * 10**9)
    src = open_location(index.root)
    run_conversion(source_checkpoint(index, mp.plan, src), [EnginePass(mp.plan)], src,
                   open_location(str(root / "hf")), str(root / "work"))
    print(f"{layers} layers: {size / 1e9:.2f} GB torch_dist → {mp.plan.total_size / 1e9:.2f} GB HF in "
          f"{len(mp.plan.shards)} shards, {time.perf_counter() - t0:.1f} s; peak RSS {vm_hwm() / 2**20:.0f} MiB "
          f"(before converting: {before / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6)

"""`ckptflow megatron` on real torch_dist bytes at two sizes: wall, GB/s and the CLI's peak RSS.

Writes a Llama-shaped Megatron-Core save (hidden 4096, GQA 32/8, ffn 11008, vocab 32000 padded to
32256, bf16, TP=2: one chunk per layer and TP rank, SwiGLU fc1 as 2 chunks per rank) in DCP's
format: each chunk a `torch.save` archive (torch's own zip layout, random payload), `.metadata`
of torch's DCP classes, `common.pt` with the args. Then, per size, in child processes:
- `ckptflow megatron SRC DST` (bench/measured_cli.py: the CLI's own VmHWM, temporary Prefect server);
- baseline 1: a plain copy of the same .distcp bytes (copy_file_range), wall and GB/s;
- baseline 2: torch's `dcp_to_torch_save` of the same save (loads the whole model): wall and VmHWM.
Usage: .venv/bin/python bench/bench_mcore.py [DIR] [--layers 1 5]

Measured (shared 2-core dev box, one run per size; `flow` excludes the temporary Prefect server's start):
  0.88 GB: CLI 34.7 s (flow 1.4 s, 0.61 GB/s), peak RSS 446 MiB | copy 0.7 s | dcp_to_torch_save 8.3 s, 1280 MiB
  2.30 GB: CLI 51.4 s (flow 3.5 s, 0.65 GB/s), peak RSS 449 MiB | copy 5.9 s | dcp_to_torch_save 20.1 s, 2624 MiB
The CLI's peak is flat in the model's size (+3 MiB for 2.6x the bytes); torch's full load grows with it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, mib, run_measured  # noqa: E402

H, HEADS, G, HD, F, V, VP, TP = 4096, 32, 8, 128, 11008, 32000, 32256, 2
BLOCK = 8 << 20

_DCP_LOAD = r"""
import sys, time
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
t = time.perf_counter()
dcp_to_torch_save(sys.argv[1], sys.argv[2])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
print(time.perf_counter() - t, hwm)
"""


def write_save(root: Path, layers: int) -> int:
    """A torch_dist save under root/iter_0000001; returns its .distcp bytes."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    from tests.mcore_sparse import archive_parts
    d = root / "iter_0000001"
    d.mkdir(parents=True)
    D = "decoder.layers."
    specs = {  # key: (global shape, stacked layer axis?, TP-cut dim or None, "swiglu")
        "embedding.word_embeddings.weight": ((VP, H), False, 0),
        D + "self_attention.linear_qkv.layer_norm_weight": ((layers, H), True, None),
        D + "self_attention.linear_qkv.weight": ((layers, (HEADS + 2 * G) * HD, H), True, 1),
        D + "self_attention.linear_proj.weight": ((layers, H, HEADS * HD), True, 2),
        D + "mlp.linear_fc1.layer_norm_weight": ((layers, H), True, None),
        D + "mlp.linear_fc1.weight": ((layers, 2 * F, H), True, "swiglu"),
        D + "mlp.linear_fc2.weight": ((layers, H, F), True, 2),
        "decoder.final_layernorm.weight": ((H,), False, None),
        "output_layer.weight": ((VP, H), False, 0),
    }
    files = [open(d / f"__{r}_0.distcp", "wb") for r in range(TP)]
    sd_meta, storage, total = {}, {}, 0
    for key, (shape, stacked, cut) in specs.items():
        chunks = []
        for lead in range(shape[0]) if stacked else [None]:
            for r in range(TP if cut is not None else 1):
                off = [0] * len(shape)
                size = list(shape)
                if stacked:
                    off[0], size[0] = lead, 1
                parts = [(cut, r * (shape[cut] // TP), shape[cut] // TP)] if isinstance(cut, int) else []
                if cut == "swiglu":  # rank r's gate rows and its up rows: two chunks
                    parts = [(1, h * F + r * (F // TP), F // TP) for h in range(2)]
                for dim, o, s in parts or [(None, 0, 0)]:
                    if dim is not None:
                        off[dim], size[dim] = o, s
                    n = 2 * math.prod(size)
                    head, _, tail, length = archive_parts(torch.bfloat16, tuple(size), n)
                    f = files[r]
                    start = f.tell()
                    f.write(head)
                    for a in range(0, n, BLOCK):
                        f.write(os.urandom(min(BLOCK, n - a)))
                    f.write(tail)
                    storage[MetadataIndex(key, torch.Size(off))] = _StorageInfo(f"__{r}_0.distcp", start, length)
                    chunks.append(ChunkStorageMetadata(torch.Size(off), torch.Size(size)))
                    total += length
        sd_meta[key] = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size(shape), chunks)
    for f in files:
        f.close()
    (d / ".metadata").write_bytes(pickle.dumps(Metadata(sd_meta, storage_data=storage)))
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    args = Namespace(hidden_size=H, ffn_hidden_size=F, num_layers=layers, num_attention_heads=HEADS,
                     group_query_attention=True, num_query_groups=G, kv_channels=HD, max_position_embeddings=4096,
                     norm_epsilon=1e-5, rotary_base=10000, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                     untie_embeddings_and_output_weights=True, vocab_size=V, tensor_model_parallel_size=TP,
                     pipeline_model_parallel_size=1, transformer_impl="local")
    torch.save({"args": args, "iteration": 1, "checkpoint_version": 3.0}, d / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    return total


def one_size(base: Path, layers: int) -> None:
    src, dst, cp = base / "src", base / "hf", base / "copy"
    shutil.rmtree(base, ignore_errors=True)
    size = write_save(src, layers)
    gb = size / 1e9
    hwm_file = base / "hwm"
    wall, _, doc = run_measured([sys.executable, str(ROOT / "bench/measured_cli.py"), "megatron", str(src), str(dst),
                                 "--work", str(base / "work"), "--json"], env={"CKPTFLOW_HWM_FILE": str(hwm_file)})
    flow_s = json.loads(doc)["seconds"]  # the flow itself: plan, shards, finalize (no Prefect server start)
    hwm = int(hwm_file.read_text()) * 1024
    out = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    cp.mkdir()
    t = time.perf_counter()
    for p in sorted((src / "iter_0000001").glob("*.distcp")):
        shutil.copyfile(p, cp / p.name)
    copy_wall = time.perf_counter() - t
    shutil.rmtree(cp)
    dcp_wall, _, line = run_measured([sys.executable, "-c", _DCP_LOAD, str(src / "iter_0000001"),
                                      str(base / "full.pt")])
    load_s, load_hwm = line.split()
    (base / "full.pt").unlink(missing_ok=True)
    print(f"{layers} layer(s), {gb:.2f} GB torch_dist -> {out / 1e9:.2f} GB HF: ckptflow megatron {wall:.1f} s "
          f"(flow {flow_s:.1f} s: {gb / flow_s:.2f} GB/s), peak RSS {mib(hwm)} | copy {copy_wall:.1f} s "
          f"({gb / copy_wall:.2f} GB/s) | dcp_to_torch_save {float(load_s):.1f} s, peak RSS {mib(int(load_hwm))} "
          f"| RSS ratio ckptflow/dcp {hwm / int(load_hwm):.2f}, flow/copy wall {flow_s / copy_wall:.1f}",
          flush=True)
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 5])  # 0.88 GB and 2.29 GB
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for layers in a.layers:
            one_size(Path(tmp) / f"l{layers}", layers)


if __name__ == "__main__":
    main()

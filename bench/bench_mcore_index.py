"""Index a torch_dist checkpoint of many chunks: time and peak RSS of `read_mcore_index`, beside
the time torch's own unpickling of the same `.metadata` takes (the classes it imports included).

Writes LAYERS × EXPERTS × TP chunks (tiny bf16 blocks, each a real `torch.save` archive, DCP's
exact layout over 8 files), then indexes them in a fresh process.
Usage: bench_mcore_index.py [DIR] [--layers 61 --experts 256 --tp 8]
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_INDEX = r"""
import json, pickle, resource, sys, time
from ckptflow.tasks.mcore.reader import read_mcore_index
import torch.distributed.checkpoint.metadata  # imported before timing either side
t = time.monotonic()
index = read_mcore_index(sys.argv[1])
took = time.monotonic() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.monotonic()
pickle.loads(open(sys.argv[1] + "/.metadata", "rb").read())  # torch's own classes
print(json.dumps({"chunks": sum(len(x.chunks) for x in index.tensors.values()), "index_s": round(took, 2),
                  "peak_rss_mb": round(rss), "torch_unpickle_s": round(time.monotonic() - t, 2)}))
"""


def write(root: Path, layers: int, experts: int, tp: int) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16), buf)
    arch = buf.getvalue()
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    files = [open(root / f"__{r}_0.distcp", "wb") for r in range(8)]
    pos = [0] * 8
    chunks, storage = [], {}
    for layer in range(layers):
        for e in range(experts):
            for t in range(tp):
                r = (e * tp + t) % 8
                files[r].write(arch)
                offsets = torch.Size([layer, e, 4 * t, 0])
                storage[MetadataIndex(key, offsets)] = _StorageInfo(f"__{r}_0.distcp", pos[r], len(arch))
                pos[r] += len(arch)
                chunks.append(ChunkStorageMetadata(offsets, torch.Size([1, 1, 4, 16])))
    for f in files:
        f.close()
    shape = torch.Size([layers, experts, 4 * tp, 16])
    meta = Metadata({key: TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), shape, chunks)},
                    storage_data=storage)
    (root / ".metadata").write_bytes(pickle.dumps(meta))
    (root / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--tp", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.dir or tmp) / "iter_0000001"
        t = time.monotonic()
        write(root, a.layers, a.experts, a.tp)
        print(f"wrote {a.layers * a.experts * a.tp} chunks in {time.monotonic() - t:.1f} s "
              f"(.metadata {(root / '.metadata').stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
        run = subprocess.run([sys.executable, "-c", _INDEX, str(root)], capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(run.stdout)))


if __name__ == "__main__":
    main()

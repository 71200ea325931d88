"""Write torch_dist checkpoints with chosen chunk layouts, in the exact format DCP writes.

Single-process `torch.distributed.checkpoint.save` cannot shard a tensor, so this writes what
each rank's FileSystemWriter would: one `torch.save` archive per chunk, back to back in
`__{rank}_0.distcp` files, and `.metadata` as a pickle of torch's own DCP dataclasses. A
`tamper` hook edits the metadata objects before pickling (hostile-input tests).
"""
from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)


def grid(shape: tuple[int, ...], splits: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of an even grid: `splits[d]` pieces along dim d."""
    per_dim = []
    for n, k in zip(shape, splits):
        step = n // k
        per_dim.append([(i * step, step if i < k - 1 else n - i * step) for i in range(k)])
    return [tuple(zip(*cell)) for cell in itertools.product(*per_dim)]  # type: ignore[misc]


def write_torch_dist(root: Path, tensors: dict[str, tuple[torch.Tensor, list]], ranks: int = 2,
                     tamper: Callable[[Metadata], Any] | None = None, common: dict | None = None) -> Path:
    """`tensors`: key → (global tensor, [(offsets, sizes), ...]); chunks go round-robin to `ranks` files."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[int, bytearray] = {r: bytearray() for r in range(ranks)}
    sd_meta, storage, n = {}, {}, 0
    for key, (full, chunks) in tensors.items():
        metas = []
        for offsets, sizes in chunks:
            piece = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
            buf = io.BytesIO()
            torch.save(piece, buf)
            rank = n % ranks
            n += 1
            blob = files[rank]
            storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(f"__{rank}_0.distcp", len(blob),
                                                                           len(buf.getvalue()))
            blob += buf.getvalue()
            metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        sd_meta[key] = TensorStorageMetadata(TensorProperties(dtype=full.dtype), full.shape, metas)
    meta = Metadata(sd_meta, storage_data=storage)
    if tamper is not None:
        tamper(meta)
    for r, blob in files.items():
        (root / f"__{r}_0.distcp").write_bytes(bytes(blob))
    (root / ".metadata").write_bytes(pickle.dumps(meta))
    (root / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    if common is not None:
        torch.save(common, root / "common.pt")
    return root

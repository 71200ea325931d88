"""Small files of a checkpoint: index, config, tokenizer and other non-weight files."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from ckptflow.storage.listing import list_tree
from ckptflow.storage.safetensors_format import MAX_TENSORS_TOTAL
from ckptflow.storage.strict_json import Budget, JSONRefused, gc_paused, loads
from ckptflow.storage.urls import Location, StorageError
from ckptflow.storage.writer import AtomicFile

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files never copied along: weights are rewritten by the stages, the index is regenerated.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def list_files(loc: Location) -> dict[str, int]:
    """Every file under `loc` (relative name → size), skipping hidden/temp names."""
    return {name: stat.size for name, stat in list_tree(loc).items()}


# Real config.json and index files are under 10 MB (an index of Kimi-K2's ~140k tensors is ~14 MB
# at most); past this the file is not one, and parsing it would cost gigabytes.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Bounds on a JSON file's structure (see storage/strict_json.py): an index needs one ':' and one
# ',' per tensor, so these fit MAX_TENSORS_TOTAL tensors and keep a parse under ~400 MB.
JSON_BUDGET = Budget(objects=1 << 18, members=MAX_TENSORS_TOTAL + 65536, items=2 * MAX_TENSORS_TOTAL + 65536,
                     why=f"no real config or index (of at most {MAX_TENSORS_TOTAL} tensors) is that large")


def read_json(loc: Location, name: str, strict: bool = False) -> Any:
    """A small JSON file, bounded in size and structure; every failure is a `StorageError`.

    `strict` also refuses duplicate keys and NaN/Infinity, as an index must (transformers' own
    loader accepts both in config.json, which is only passed through).
    """
    try:
        with loc.fs.open(loc.path(name), "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise StorageError(f"{loc.url_of(name)}: file not found") from None
    if len(raw) > MAX_JSON_BYTES:
        raise StorageError(f"{loc.url_of(name)}: larger than {MAX_JSON_BYTES >> 20} MiB; no real config "
                           "or index is, so it is not one (corrupt or hostile)")
    try:
        JSON_BUDGET.check(raw)
        with gc_paused():
            return loads(raw, unique_keys=strict, allow_nan=not strict)
    except JSONRefused as exc:
        raise StorageError(f"{loc.url_of(name)}: {str(exc).removeprefix('is ')}") from None


def write_bytes_atomic(loc: Location, name: str, data: bytes) -> None:
    f = AtomicFile(loc, name)
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.commit()


def write_json(loc: Location, name: str, obj: Any) -> None:
    write_bytes_atomic(loc, name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def index_document(weight_map: dict[str, str], total_size: int,
                   extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `model.safetensors.index.json` body: weight_map sorted by name, as transformers writes."""
    metadata = dict(extra_metadata or {})
    metadata["total_size"] = int(total_size)
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def copy_file(src: Location, dst: Location, name: str, hashes: tuple[str, ...] = (),
              chunk: int = 8 << 20, on_bytes: Callable[[int], None] | None = None,
              dest_name: str | None = None) -> tuple[int, dict[str, str]]:
    """Stream one file from `src` to `dst` (atomic at the destination).

    Returns the bytes copied and the hex digests named in `hashes` (hashlib names).
    """
    out = AtomicFile(dst, dest_name or name)
    digests = {h: hashlib.new(h) for h in hashes}
    try:
        with src.fs.open(src.path(name), "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                out.write(block)
                for d in digests.values():
                    d.update(block)
                if on_bytes:
                    on_bytes(len(block))
    except FileNotFoundError:
        out.abort()
        raise StorageError(f"{src.url_of(name)}: file not found") from None
    except BaseException:
        out.abort()
        raise
    out.commit()
    return out.size, {h: d.hexdigest() for h, d in digests.items()}

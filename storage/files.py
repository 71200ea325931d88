"""Small files of a checkpoint: index, config, tokenizer and other non-weight files."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from .listing import list_tree
from .urls import Location, StorageError
from .writer import AtomicFile

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files never copied along: weights are rewritten by the stages, the index is regenerated.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def list_files(loc: Location) -> dict[str, int]:
    """Every file under `loc` (relative name → size), skipping hidden/temp names."""
    return {name: stat.size for name, stat in list_tree(loc).items()}


def read_json(loc: Location, name: str) -> Any:
    try:
        with loc.fs.open(loc.path(name), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise StorageError(f"{loc.url_of(name)}: file not found") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{loc.url_of(name)}: not valid JSON ({exc})") from None


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

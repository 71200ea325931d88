"""A checkpoint as the planners see it: file list, parsed headers, index and config.

`scan_checkpoint` does all the I/O a plan needs — a listing, one small range read per shard
header (in parallel), the index and config.json — and returns plain data.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .files import CONFIG_NAME, INDEX_NAME, list_files, read_json
from .reader import file_info, read_header
from .safetensors_format import Header, HeaderError, TensorInfo
from .urls import Location, StorageError


@dataclass(frozen=True)
class Checkpoint:
    url: str
    files: dict[str, int]                      # every file: name → size
    headers: dict[str, Header]                 # safetensors files whose header parsed
    header_errors: dict[str, str] = field(default_factory=dict)
    index: dict[str, Any] | None = None        # model.safetensors.index.json, as read
    config: dict[str, Any] | None = None       # config.json, as read
    versions: dict[str, str | None] = field(default_factory=dict)  # etag / mtime per weight file

    @property
    def weight_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    def weight_map(self) -> dict[str, str]:
        """tensor name → file: from the index when there is one, else from the headers."""
        if self.index is not None:
            return dict(self.index.get("weight_map") or {})
        return {t: f for f, h in sorted(self.headers.items()) for t in h.tensors}

    def tensors(self) -> dict[str, tuple[str, TensorInfo]]:
        """Every tensor actually present in a parsed header: name → (file, info)."""
        out: dict[str, tuple[str, TensorInfo]] = {}
        for f, h in sorted(self.headers.items()):
            for t, info in h.tensors.items():
                out.setdefault(t, (f, info))
        return out

    def fingerprint(self, name: str) -> tuple[str, int, str | None]:
        return (name, self.files.get(name, -1), self.versions.get(name))

    def other_files(self) -> list[str]:
        """Non-weight files a conversion carries over (config, tokenizer, …), minus the index."""
        return [n for n in self.files
                if not n.endswith((".safetensors", ".bin", ".pt", ".pth")) and n != INDEX_NAME]


def scan_checkpoint(loc: Location, max_workers: int = 16) -> Checkpoint:
    files = list_files(loc)
    if not files:
        raise StorageError(f"{loc.url}: no files found; is this the checkpoint directory?")
    weight_files = [n for n in files if n.endswith(".safetensors")]

    def one(name: str) -> tuple[str, Header | str, str | None]:
        try:
            version = file_info(loc, name)["version"]
            return name, read_header(loc, name, files[name]), version
        except HeaderError as exc:
            return name, exc.reason, None

    headers: dict[str, Header] = {}
    errors: dict[str, str] = {}
    versions: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(weight_files) or 1))) as pool:
        for name, result, version in pool.map(one, weight_files):
            versions[name] = version
            if isinstance(result, Header):
                headers[name] = result
            else:
                errors[name] = result
    index = read_json(loc, INDEX_NAME) if INDEX_NAME in files else None
    config = read_json(loc, CONFIG_NAME) if CONFIG_NAME in files else None
    return Checkpoint(loc.url, files, headers, errors, index, config, versions)

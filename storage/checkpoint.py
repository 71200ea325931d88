"""A checkpoint as the planners see it: file list, parsed headers, index and config.

`scan_checkpoint` does all the I/O a plan needs — a listing, one small range read per shard
header (in parallel), the index and config.json — and returns plain data.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptflow.storage.files import CONFIG_NAME, INDEX_NAME, WEIGHT_SUFFIXES, list_files, read_json
from ckptflow.storage.reader import file_info, read_header
from ckptflow.storage.safetensors_format import MAX_TENSORS_TOTAL, Header, HeaderError, TensorInfo
from ckptflow.storage.strict_json import kind, short
from ckptflow.storage.urls import Location, StorageError

# DeepSeek-V3 has 163 weight files, the biggest real checkpoints a few hundred; a listing of more
# is not one checkpoint, and each file costs a header read.
MAX_WEIGHT_FILES = 20_000
# NVIDIA ModelOpt exports describe their quantization here instead of (or besides) config.json.
QUANT_CONFIG_NAME = "hf_quant_config.json"


@dataclass(frozen=True)
class Checkpoint:
    url: str
    files: dict[str, int]                      # every file: name → size
    headers: dict[str, Header]                 # safetensors files whose header parsed
    header_errors: dict[str, str] = field(default_factory=dict)
    index: dict[str, Any] | None = None        # model.safetensors.index.json, as read
    config: dict[str, Any] | None = None       # config.json, as read
    versions: dict[str, str | None] = field(default_factory=dict)  # etag / mtime per weight file
    quant_config: dict[str, Any] | None = None  # ModelOpt's hf_quant_config.json, as read

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
                if not n.endswith(WEIGHT_SUFFIXES) and n != INDEX_NAME]


def scan_checkpoint(loc: Location, max_workers: int = 16) -> Checkpoint:
    """List `loc`, read every shard header, the index and config.json; refuse what is not a checkpoint.

    Raises `StorageError` before any stage writes anything when the index or config.json has
    the wrong shape, or when the checkpoint holds more tensors than any real one.
    """
    files = list_files(loc)
    if not files:
        raise StorageError(f"{loc.url}: no files found; is this the checkpoint directory?")
    weight_files = [n for n in files if n.endswith(".safetensors")]
    if len(weight_files) > MAX_WEIGHT_FILES:
        raise StorageError(f"{loc.url}: {len(weight_files)} .safetensors files; ckptflow reads at most "
                           f"{MAX_WEIGHT_FILES} (real checkpoints have a few hundred) — is this one checkpoint?")
    index = check_index(loc, read_json(loc, INDEX_NAME, strict=True)) if INDEX_NAME in files else None
    config = check_config(loc, read_json(loc, CONFIG_NAME)) if CONFIG_NAME in files else None
    quant = read_json(loc, QUANT_CONFIG_NAME) if QUANT_CONFIG_NAME in files else None
    if quant is not None and not isinstance(quant, dict):
        raise StorageError(f"{loc.url_of(QUANT_CONFIG_NAME)}: must be a JSON object (ModelOpt's "
                           f'{{"producer": …, "quantization": …}}), got {kind(quant)}')
    counted = _TensorCount(loc.url)

    def one(name: str) -> tuple[str, Header | str | None, str | None]:
        if counted.over:
            return name, None, None  # the scan has failed already; read nothing more
        try:
            version = file_info(loc, name)["version"]
            header = read_header(loc, name, files[name])
        except HeaderError as exc:
            return name, exc.reason, None
        counted.add(len(header.tensors))
        return name, header, version

    headers: dict[str, Header] = {}
    errors: dict[str, str] = {}
    versions: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(weight_files) or 1))) as pool:
        for name, result, version in pool.map(one, weight_files):
            versions[name] = version
            if isinstance(result, Header):
                headers[name] = result
            elif result is not None:
                errors[name] = result
    counted.check()
    return Checkpoint(loc.url, files, headers, errors, index, config, versions, quant)


def refuse_changed(loc: Location, fingerprints: list[tuple[str, int, str | None]]) -> None:
    """Raise a `StorageError` naming the first file of `fingerprints` (`Checkpoint.fingerprint`s
    recorded when the run was planned) whose size or version is no longer what it was.

    A shard task calls this after its last read and before it publishes: bytes read from a file
    rewritten or replaced mid-run would mix two checkpoints, and such a shard must never get its
    final name. Locally a stat each (the version holds mtime, ctime and inode: an in-place edit
    changes ctime, a replacement the inode, whatever size and mtime are put back); remotely a HEAD
    each, in parallel (the ETag), past any cached listing."""
    def now(fp: Any) -> tuple[str, tuple[int, str | None], tuple[int, str | None] | None]:
        name, size, version = fp
        if not loc.is_local:
            loc.fs.invalidate_cache(loc.path(name))
        try:
            info = file_info(loc, name)
        except StorageError:
            return name, (size, version), None
        return name, (size, version), (info["size"], info["version"])

    fps = [tuple(fp) for fp in fingerprints]  # a Prefect round trip may turn tuples into lists
    if loc.is_local:
        found = [now(fp) for fp in fps]
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(fps)))) as pool:
            found = list(pool.map(now, fps))
    for name, planned, current in found:
        if current != planned:
            raise StorageError(f"SOURCE file {loc.url_of(name)} changed during the run "
                               f"({_what_changed(planned, current, loc.is_local)}); rerun when it is no "
                               "longer being written (no shard holding bytes read after the change was published)")


def _what_changed(planned: tuple[int, str | None], current: tuple[int, str | None] | None, local: bool) -> str:
    if current is None:
        return "it is gone: deleted or renamed"
    (size0, v0), (size1, v1) = planned, current
    said = [f"size {size0:,} → {size1:,} bytes"] if size0 != size1 else []
    parts0, parts1 = str(v0).split(":"), str(v1).split(":")
    if local and len(parts0) == len(parts1) == 3:  # listing.version_of: mtime, ctime, inode
        if parts0[2] != parts1[2]:
            said.append(f"replaced by another file: inode {parts0[2]} → {parts1[2]}")
        elif parts0[1] != parts1[1]:
            said.append("rewritten in place: its ctime moved" + (", mtime put back" if parts0[0] == parts1[0] else ""))
        elif parts0[0] != parts1[0]:
            said.append("modified: its mtime moved")
    elif v0 != v1:
        said.append(f"version {v0} → {v1}" if not local else "its stat changed")
    return "; ".join(said) or "its identity changed"


class _TensorCount:
    """Tensors parsed so far over every thread; past MAX_TENSORS_TOTAL the scan stops reading."""

    def __init__(self, url: str):
        self.url, self.total, self.over = url, 0, False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n
            self.over = self.over or self.total > MAX_TENSORS_TOTAL

    def check(self) -> None:
        if self.over:
            raise StorageError(f"{self.url}: more than {MAX_TENSORS_TOTAL} tensors in all; ckptflow reads at "
                               "most that many (the largest real checkpoints, Kimi-K2 and DeepSeek-V3, have "
                               "~140k and ~91k) — is this one checkpoint?")


def check_index(loc: Location, index: Any) -> dict[str, Any]:
    """`index` if it has the shape transformers writes; else a `StorageError` saying what is wrong."""
    where = loc.url_of(INDEX_NAME)
    if not isinstance(index, dict):
        raise StorageError(f'{where}: must be an object with "weight_map" and "metadata", got {kind(index)}')
    weight_map = index.get("weight_map")
    if weight_map is not None:  # a missing one is reported by validate, with every other problem
        if not isinstance(weight_map, dict):
            raise StorageError(f'{where}: "weight_map" must be an object of tensor name → file name, '
                               f"got {kind(weight_map)}")
        bad = next(((t, f) for t, f in weight_map.items() if not isinstance(f, str)), None)
        if bad is not None:
            raise StorageError(f'{where}: "weight_map" must map tensor names to file names, but '
                               f"{short(bad[0], 120)} maps to {kind(bad[1])}")
        if len(weight_map) > MAX_TENSORS_TOTAL:
            raise StorageError(f'{where}: "weight_map" lists {len(weight_map)} tensors; ckptflow reads at most '
                               f"{MAX_TENSORS_TOTAL} (Kimi-K2 has ~140k) — the index is corrupt or hostile")
    metadata = index.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise StorageError(f'{where}: "metadata" must be an object (of "total_size" and the like), '
                               f"got {kind(metadata)}")
        total = metadata.get("total_size")
        if total is not None and not _is_size(total):
            raise StorageError(f'{where}: "metadata.total_size" must be a whole number of bytes, got '
                               f"{short(total, 60)} ({kind(total)})")
    return index


def _is_size(x: Any) -> bool:
    # Some writers store total_size as 1.2e10; a whole, finite, non-negative number is fine.
    if isinstance(x, bool):
        return False
    return (isinstance(x, int) and x >= 0) or (isinstance(x, float) and x.is_integer() and x >= 0)


def check_config(loc: Location, config: Any) -> dict[str, Any]:
    """`config` if it is an object whose fields ckptflow reads have their JSON types."""
    where = loc.url_of(CONFIG_NAME)
    if not isinstance(config, dict):
        raise StorageError(f"{where}: must be a JSON object of model settings, got {kind(config)}")
    for key, want, ok in (("quantization_config", "an object", lambda v: isinstance(v, dict)),
                          ("model_type", "a string", lambda v: isinstance(v, str))):
        value = config.get(key)
        if value is not None and not ok(value):
            raise StorageError(f'{where}: "{key}" must be {want}, got {short(value, 60)} ({kind(value)})')
    return config

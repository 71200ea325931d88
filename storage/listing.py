"""Listing a location in one call: every file's size, version (etag / mtime) and age.

One recursive listing (`fs.find(detail=True)`; one paged LIST on object stores) gives what
checkpoint scans and the watch flow need, without a HEAD per file.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .urls import Location, StorageError


@dataclass(frozen=True)
class FileStat:
    size: int
    version: str | None     # etag, md5 or mtime: changes when the file's bytes do
    modified: float | None  # seconds since the epoch, when the store says


def version_of(info: dict[str, Any]) -> str | None:
    """What identifies this version of a file in an fsspec `info` dict, across stores."""
    etag = info.get("ETag") or info.get("etag")
    version = etag or info.get("md5Hash") or info.get("mtime") or info.get("LastModified") \
        or info.get("last_modified") or info.get("updated") or info.get("created")
    return str(version) if version is not None else None


def modified_of(info: dict[str, Any]) -> float | None:
    """Last-modified time in epoch seconds: local `mtime`, S3 `LastModified`, GCS `updated`, Azure
    `last_modified`; None when the store gives none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.timezone.utc)
            return value.timestamp()
    return None


def list_tree(loc: Location) -> dict[str, FileStat]:
    """Every file under `loc` (relative name → FileStat), skipping hidden/temp names and object
    stores' zero-byte "folder" markers."""
    loc.fs.invalidate_cache(loc.root)  # a long-lived process (a served flow) must see new uploads
    try:
        found = loc.fs.find(loc.root, detail=True)
    except FileNotFoundError:
        raise StorageError(f"{loc.url}: no such directory") from None
    out: dict[str, FileStat] = {}
    prefix = loc.root.rstrip("/") + "/"
    for path, info in found.items():
        if info.get("type") == "directory" or path.endswith("/"):
            continue
        rel = path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        out[rel] = FileStat(int(info.get("size") or 0), version_of(info), modified_of(info))
    return dict(sorted(out.items()))

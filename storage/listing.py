"""Listing a location in one call: every file's size, version (etag / mtime) and age.

One recursive listing (`fs.find(detail=True)`; one paged LIST on object stores) gives what
checkpoint scans and the watch flow need, without a HEAD per file.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

from ckptflow.storage.faults import storage_errors
from ckptflow.storage.urls import Location, StorageError


@dataclass(frozen=True)
class FileStat:
    size: int
    version: str | None     # etag, md5 or mtime: changes when the file's bytes do
    modified: float | None  # seconds since the epoch, when the store says


def version_of(info: dict[str, Any]) -> str | None:
    """What identifies this version of a file in an fsspec `info` dict, across stores.

    Local files: mtime, ctime and inode together. A file rewritten in place with its size kept
    and its mtime put back still gets a new ctime (no user call can set it), and a file replaced
    by another gets a new inode."""
    if "ino" in info and "mtime" in info:
        return f"{info['mtime']!r}:{info.get('created')!r}:{info['ino']}"
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
        with storage_errors(loc.url):  # often a run's first request: a bad endpoint or key shows here
            found = _walk_local(loc.root) if loc.is_local else loc.fs.find(loc.root, detail=True)
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


def _walk_local(root: str) -> dict[str, dict[str, Any]]:
    """`fs.find(detail=True)` for a local tree, following symlinked directories (a Hugging Face
    cache snapshot, a tree assembled from links) once each: a link loop is not walked again.
    A broken link is skipped. The info dicts carry what `version_of` / `modified_of` read."""
    if os.path.isfile(root):
        st = os.stat(root)
        return {root: _local_info(root, st)}
    if not os.path.isdir(root):
        return {}  # as fsspec's local `find` says: nothing there (callers word the error)
    out: dict[str, dict[str, Any]] = {}
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):  # hidden and temp names are never listed; skip their trees
                    continue
                try:
                    if e.is_dir(follow_symlinks=True):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=True):
                        out[e.path] = _local_info(e.path, e.stat(follow_symlinks=True))
                except OSError:  # a broken link, or a file gone while listing
                    continue
    return out


def _local_info(path: str, st: os.stat_result) -> dict[str, Any]:
    return {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime,
            "created": st.st_ctime, "ino": st.st_ino}


def file_identity(loc: Location, name: str) -> str | None:
    """What proves on a later run that `name` is still the file this run committed: size, mtime,
    device, inode and ctime locally (nanoseconds); size and ETag remotely."""
    if loc.is_local:
        try:
            st = os.stat(loc.path(name))
        except FileNotFoundError:
            return None
        return f"{local_identity_before_rename(st)}:{st.st_ctime_ns}"
    try:
        info = loc.fs.info(loc.path(name))
    except FileNotFoundError:
        return None
    return _remote_identity(info)


def local_identity_before_rename(st: os.stat_result) -> str:
    """The part of a local file's identity a rename keeps (a rename sets ctime): a journal entry
    written just before the rename that publishes a shard can name its file with it."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_dev}:{st.st_ino}"


def _remote_identity(info: dict[str, Any]) -> str:
    # The ETag (else the store's version field): a listing and a HEAD give the same one, which a
    # version id is not (S3 lists no VersionId), so both ways of asking agree.
    tag = str(version_of(info) or "").strip('"')
    return f"{int(info.get('size') or 0)}:{tag}"


def file_identities(loc: Location, names: list[str]) -> dict[str, str | None]:
    """`file_identity` of each name: a stat each locally, one listing on object stores."""
    if loc.is_local:
        return {n: file_identity(loc, n) for n in names}
    loc.fs.invalidate_cache(loc.root)
    try:
        found = loc.fs.find(loc.root, detail=True)
    except FileNotFoundError:
        found = {}
    by_path = {p.rstrip("/"): info for p, info in found.items()}
    return {n: (_remote_identity(by_path[loc.path(n)]) if loc.path(n) in by_path else None) for n in names}

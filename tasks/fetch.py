"""Fetch: copy a checkpoint's files into a working location, verified, skipping what is there.

`plan_fetch` is pure: given the source listing (size + version per file) and the markers left
by earlier fetches, it says which files to copy. `fetch_file` copies one, checking size always,
the S3 ETag when it is a plain MD5, and the sha256 when the store publishes one (hf://).
"""
from __future__ import annotations

import re
from typing import Any

from prefect import task

from ckptflow.storage.files import copy_file, read_json, write_json
from ckptflow.storage.reader import file_info
from ckptflow.storage.urls import Location, StorageError, open_location

from ckptflow.storage.transient import TRANSIENT_RETRIES
from ckptflow.tasks.run import progress

MARKER_DIR = ".ckptflow-fetch"
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


def plan_fetch(source: dict[str, dict[str, Any]], markers: dict[str, dict[str, Any]],
               local_sizes: dict[str, int]) -> list[str]:
    """Names to copy: those without a marker matching the source's size and version on disk."""
    todo = []
    for name, meta in sorted(source.items()):
        marker = markers.get(name)
        fresh = (marker is not None and marker.get("size") == meta["size"]
                 and marker.get("version") == meta.get("version")
                 and local_sizes.get(name) == meta["size"])
        if not fresh:
            todo.append(name)
    return todo


def _marker_name(name: str) -> str:
    return f"{MARKER_DIR}/{name}.json"


def read_markers(dst: Location, names: list[str], local_sizes: dict[str, int]) -> dict[str, dict]:
    out = {}
    for name in names:
        if name in local_sizes:
            try:
                out[name] = read_json(dst, _marker_name(name))
            except StorageError:
                pass
    return out


@task(name="fetch-file", **TRANSIENT_RETRIES)
def fetch_file(source: str, dest: str, name: str, meta: dict[str, Any],
               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    src = open_location(source, storage_options)
    dst = open_location(dest, storage_options)
    etag = meta.get("etag") or ""
    hashes = tuple(h for h, want in (("md5", _PLAIN_MD5.match(etag)), ("sha256", meta.get("sha256"))) if want)
    size, digests = copy_file(src, dst, name, hashes, on_bytes=progress.add_bytes)
    if size != meta["size"]:
        dst.fs.rm(dst.path(name))
        raise StorageError(f"{src.url_of(name)}: fetched {size} bytes but the store lists {meta['size']}; "
                           "the object changed during the fetch — run again")
    for alg, want in (("md5", etag), ("sha256", meta.get("sha256"))):
        if alg in digests and digests[alg] != want:
            dst.fs.rm(dst.path(name))
            raise StorageError(f"{src.url_of(name)}: {alg} of the fetched bytes is {digests[alg]} but the "
                               f"store says {want}; the copy is corrupt — run again")
    record = {"name": name, "size": size, "version": meta.get("version"), "verified": sorted(digests) + ["size"]}
    write_json(dst, _marker_name(name), record)
    progress.shard_done()
    return record


def source_listing(src: Location, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: file_info(src, n) for n in names}

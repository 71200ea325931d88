"""Where bytes live: one place that turns a URL into an fsspec filesystem and a path.

Every other module asks this one for a `Location`; none imports fsspec itself. Local paths,
`memory://`, `s3://`, `gs://`, `az://`, `hf://` all go through `fsspec.core.url_to_fs`, so
fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL`` and friends) applies unchanged.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .errors import UserError
from fsspec.implementations.local import LocalFileSystem


class StorageError(UserError):
    """A user-facing storage problem: the message names the URL and what to do."""


@dataclass(frozen=True)
class Location:
    """A directory-like place: the filesystem, the root path in it, and the original URL."""

    url: str
    fs: Any = field(compare=False, repr=False)
    root: str = ""

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """The filesystem path of `name` (relative, '/'-separated) under this location."""
        return posixpath.join(self.root, name) if name else self.root

    def url_of(self, name: str) -> str:
        """A URL for `name` that `open_location` can open again."""
        return self.url.rstrip("/") + "/" + name if name else self.url

    def child(self, name: str) -> "Location":
        return Location(self.url_of(name), self.fs, self.path(name))


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` JSON → dict, with an error that says what was wrong."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"--storage-options is not valid JSON ({exc}); pass e.g. "
                           '\'{"anon": false, "client_kwargs": {"endpoint_url": "http://..."}}\'') from None
    if not isinstance(value, dict):
        raise StorageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Open `url` (any fsspec URL or a local path) as a `Location`."""
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {url!r}: {exc}") from None
    if isinstance(fs, LocalFileSystem):
        root = fs._strip_protocol(root)  # absolute, so renames and temp files stay on one disk
    return Location(url, fs, root.rstrip("/") or root)

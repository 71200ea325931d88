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

from ckptflow.storage.errors import UserError
from fsspec.implementations.local import LocalFileSystem


OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


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

    @property
    def is_object_store(self) -> bool:
        """Buckets of keys, not directories: nothing to make before writing, and `makedirs` on
        s3fs would create a missing bucket."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)

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


def protocol_of(url: str) -> str | None:
    """The protocol of a plain URL ("s3" for s3://b/k); None for local paths and chained URLs."""
    if "::" in url or "://" not in url:
        return None
    return url.split("://", 1)[0].lower()


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Open `url` (any fsspec URL or a local path) as a `Location`.

    On s3:// the options are checked first (a wrong name or type is one line here, not a
    traceback at the first request) and get bounded timeouts and retries (`ckptflow.storage.s3_options`),
    and every call a deadline over all of them (`ckptflow.storage.deadline`).
    """
    options = dict(storage_options or {})
    s3 = protocol_of(url) in ("s3", "s3a")
    if s3:
        from ckptflow.storage.s3_options import check_s3_options, with_s3_defaults

        check_s3_options(url, options)
        options = with_s3_defaults(options, fsspec.config.conf.get("s3"))
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError, TypeError, KeyError) as exc:  # a constructor's refusal of an option
        raise StorageError(f"cannot open {url!r}: {exc}") from None
    if s3:
        from ckptflow.storage.deadline import bound_s3_calls
        from ckptflow.storage.s3_options import bound_s3fs_retries

        bound_s3fs_retries(fs)
        bound_s3_calls(fs)
    if isinstance(fs, LocalFileSystem):
        root = fs._strip_protocol(root)  # absolute, so renames and temp files stay on one disk
    return Location(url, fs, root.rstrip("/") or root)


def effective_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options `open_location` really passes for `url`, for code that builds its own filesystem
    from them (Prefect's `RemoteFileSystem` result storage)."""
    options = dict(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        from ckptflow.storage.s3_options import with_s3_defaults

        options = with_s3_defaults(options, fsspec.config.conf.get("s3"))
    return options

"""SOURCE is read-only to ckptflow: refuse any run whose locations overlap, however they are spelled.

Comparing URL strings is not enough: `/x/src`, `/x/../x/src`, `/x/./src/`, a symlink to it and a
bind mount of it are all the same directory. Locally each location is resolved with `realpath`,
and every existing ancestor is compared by device and inode (`samefile`), which also sees bind
mounts and hard-linked names. On object stores a location is its protocol, bucket and
normalised key prefix.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import Any

from ckptflow.storage.urls import Location, StorageError


def _protocol(loc: Location) -> str:
    p = loc.fs.protocol
    return (p[0] if isinstance(p, (tuple, list)) else p) or "file"


def _key(loc: Location) -> str:
    """The location's path with `.`, `..` and doubled slashes resolved (never a filesystem call)."""
    path = posixpath.normpath("/" + loc.root.lstrip("/"))
    return path if path == "/" else path.rstrip("/")


def _local_ancestors(path: str) -> Iterator[os.stat_result]:
    """stat of `path` and each of its ancestors that exist (a DEST may not exist yet)."""
    path = os.path.realpath(path)
    while True:
        try:
            yield os.stat(path)
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _local_inside(inner: str, outer: str) -> bool:
    """Is `inner` equal to or under `outer`, by real path or by (device, inode) of an ancestor?"""
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    if a == b or a.startswith(b.rstrip("/") + "/"):
        return True
    try:
        target = os.stat(b)
    except OSError:
        return False
    return any((st.st_dev, st.st_ino) == (target.st_dev, target.st_ino) for st in _local_ancestors(a))


def inside(inner: Location, outer: Location) -> bool:
    """True when `inner` is `outer` or lies under it."""
    if inner.is_local != outer.is_local:
        return False
    if inner.is_local:
        return _local_inside(inner.root, outer.root)
    if _protocol(inner) != _protocol(outer):
        return False
    a, b = _key(inner), _key(outer)
    return a == b or b == "/" or a.startswith(b + "/")


def refuse_overlap(first: tuple[str, Location], *others: tuple[str, Location],
                   allow_nested: frozenset[tuple[str, str]] = frozenset()) -> None:
    """Raise unless no location equals or contains another.

    Each argument is `(role, location)`, e.g. `("SOURCE", src)`. `allow_nested` lists
    `(inner_role, outer_role)` pairs that may nest (the watch flow keeps its work prefix inside
    DEST_PREFIX by default; they are never equal). SOURCE may never nest with anything.
    """
    named = [first, *others]
    for i, (role_a, a) in enumerate(named):
        for role_b, b in named[i + 1:]:
            for (r_in, loc_in), (r_out, loc_out) in (((role_a, a), (role_b, b)), ((role_b, b), (role_a, a))):
                if not inside(loc_in, loc_out):
                    continue
                if (r_in, r_out) in allow_nested and not inside(loc_out, loc_in):
                    continue
                how = "is the same place as" if inside(loc_out, loc_in) else "lies inside"
                keep, change = (r_in, r_out) if r_in.startswith("SOURCE") else (r_out, r_in)
                raise StorageError(
                    f"{r_in} {loc_in.url} {how} {r_out} {loc_out.url}; nothing was written. Choose a "
                    f"{change} that neither is, contains nor lies inside {keep}")


def refuse_under(path: str, loc: Location, protected: Location, role: str = "SOURCE") -> None:
    """Last guard before a delete: never remove anything under `protected` (SOURCE)."""
    if inside(Location(loc.url, loc.fs, path), protected):
        raise StorageError(f"refusing to delete {path}: it lies inside {role} {protected.url}")


def open_watch_prefixes(source_prefix: str, dest_prefix: str, work_prefix: str | None,
                        storage_options: dict[str, Any] | None) -> tuple[Location, Location, Location]:
    """SOURCE_PREFIX, DEST_PREFIX and the work prefix of a watch run, refused when they overlap or
    the source is missing: the CLI calls it before Prefect starts, the watch flow again."""
    from ckptflow.storage.urls import open_location

    dst = open_location(dest_prefix, storage_options)
    work = open_location(work_prefix or dst.url_of(".ckptflow-work"), storage_options)
    src = open_location(source_prefix, storage_options)
    # The work prefix lives inside DEST_PREFIX by default (hidden, never listed as output).
    refuse_overlap(("SOURCE_PREFIX", src), ("DEST_PREFIX", dst), ("--work-prefix", work),
                   allow_nested=frozenset({("--work-prefix", "DEST_PREFIX")}))
    if not src.fs.exists(src.root):
        raise StorageError(f"{source_prefix}: no such folder or prefix; check SOURCE_PREFIX "
                           "(the watch flow's source_prefix)")
    return src, dst, work

"""Compare-and-swap on one small object: what an object-store lock is built from.

Two runs that read a lock, see it free (or stale) and then write it would both believe they hold
it; a write that succeeds only if the object is still what this run last saw cannot be raced.

- S3 (s3fs): `PutObject` with `If-None-Match: *` (create only if absent) and `If-Match: <ETag>`
  (replace only the version this run read or wrote), `DeleteObject` with `If-Match`. AWS S3 has
  honoured both on PUT since 2024 (botocore ≥ 1.35.20; moto 5.2 implements them). s3fs 2026.9
  offers only the create side (`open(path, "xb")`, `pipe_file(mode="create")`), and translates a
  failed `If-Match` into a bare `OSError(EINVAL)`, so the calls go to the client directly and
  failures are told apart by their S3 error code.
- Any other store (memory://, gcsfs, adlfs): read, compare, write under a process-wide mutex.
  Atomic between the threads of one process only; across machines two runs could still both
  write in the instant between one's read and its write. Say so rather than pretend.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any

from ckptflow.storage.urls import Location

# S3 error codes that mean "the object is not the version you named" (412) or "another
# conditional write to it is in flight" (409): both mean this write lost the race.
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING = {"NoSuchKey", "404"}
_mutex = threading.Lock()


def _is_s3(loc: Location) -> bool:
    return hasattr(loc.fs, "call_s3") and hasattr(loc.fs, "split_path")


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (it keeps the botocore error as the cause)."""
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code"))
    return None


def read(loc: Location, name: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of those very bytes (one GET), or None if it is absent."""
    if _is_s3(loc):
        from fsspec.asyn import sync

        bucket, key, _ = loc.fs.split_path(loc.path(name))

        async def get() -> tuple[bytes, str]:
            resp = await loc.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), str(resp["ETag"])
            finally:
                resp["Body"].close()

        try:
            return sync(loc.fs.loop, get)
        except FileNotFoundError:
            return None
    try:
        data = loc.fs.cat_file(loc.path(name))
    except FileNotFoundError:
        return None
    return data, _digest(data)


def create(loc: Location, name: str, body: bytes) -> str | None:
    """Write the object only if none exists; its new ETag, or None when one exists."""
    if _is_s3(loc):
        return _s3_put(loc, name, body, IfNoneMatch="*")
    with _mutex:
        if loc.fs.exists(loc.path(name)):
            return None
        loc.fs.pipe_file(loc.path(name), body)
    return _digest(body)


def replace(loc: Location, name: str, body: bytes, etag: str) -> str | None:
    """Overwrite the object only while it is still the version `etag`; the new ETag, or None
    when it changed or is gone (another run took it, or released it)."""
    if _is_s3(loc):
        return _s3_put(loc, name, body, IfMatch=etag)
    with _mutex:
        current = read(loc, name)
        if current is None or current[1] != etag:
            return None
        loc.fs.pipe_file(loc.path(name), body)
    return _digest(body)


def delete(loc: Location, name: str, etag: str) -> bool:
    """Delete the object only while it is still the version `etag`; False if it is not."""
    if _is_s3(loc):
        bucket, key, _ = loc.fs.split_path(loc.path(name))
        try:
            loc.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except OSError as exc:
            if _s3_code(exc) in _LOST_RACE | _MISSING or isinstance(exc, FileNotFoundError):
                return False
            raise
        loc.fs.invalidate_cache(loc.path(name))
        return True
    with _mutex:
        current = read(loc, name)
        if current is None or current[1] != etag:
            return False
        loc.fs.rm(loc.path(name))
    return True


def _s3_put(loc: Location, name: str, body: bytes, **condition: Any) -> str | None:
    bucket, key, _ = loc.fs.split_path(loc.path(name))
    try:
        out = loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    except (FileExistsError, FileNotFoundError):  # If-None-Match lost / If-Match on a deleted object
        return None
    except OSError as exc:
        if _s3_code(exc) in _LOST_RACE | _MISSING:
            return None
        raise
    finally:
        loc.fs.invalidate_cache(loc.path(name))
    return str(out["ETag"])


def _digest(data: bytes) -> str:
    # Stands in for an ETag where the store has none we can condition on: every lock body holds
    # a fresh token and heartbeat, so two versions never share a digest.
    return hashlib.sha256(data).hexdigest()

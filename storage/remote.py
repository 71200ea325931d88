"""Before a run writes anything: does DEST's bucket exist, and may these credentials write there?

ckptflow never creates a bucket. A missing one is a typo or a missing setup step, and a bucket
made by accident has the wrong region, policy and owner. s3fs would make one: `makedirs` (ours
and Prefect's result storage's) creates a missing bucket. So object-store writers skip
`makedirs` (keys need no directories), and this check runs on DEST and on a remote work
location before the first write, so the run stops with one line instead of failing every shard.
"""
from __future__ import annotations

import os
import uuid

from ckptflow.storage.faults import is_missing_bucket, storage_errors
from ckptflow.storage.urls import Location, StorageError

PROBE_PREFIX = ".ckptflow-write-probe-"  # hidden: listings skip it, were it ever to appear


def bucket_of(loc: Location) -> str | None:
    """The bucket (container) `loc` lives in, for object stores; None elsewhere."""
    if not loc.is_object_store:
        return None
    return loc.root.strip("/").split("/", 1)[0] or None


def missing_bucket(loc: Location, bucket: str) -> StorageError:
    return StorageError(f"{loc.url}: bucket {bucket!r} does not exist; create it first "
                        "(ckptflow never creates buckets)")


def check_writable_dest(loc: Location) -> None:
    """Raise `StorageError` unless a run can write under `loc`. Leaves nothing behind.

    - s3: starts a multipart upload of a hidden key under `loc` and aborts it: that needs the
      bucket to exist and the s3:PutObject permission the writer needs, and makes no object.
      (HeadBucket would need s3:ListBucket, which a write-only credential may lack.)
    - other object stores: the bucket (container) exists.
    - local paths: the nearest existing ancestor is a directory this process may write.
    - anything else (memory://, hf://): nothing is checked here.
    """
    if loc.is_local:
        _check_local(loc)
        return
    bucket = bucket_of(loc)
    if bucket is None:
        return
    protocols = loc.fs.protocol if isinstance(loc.fs.protocol, (tuple, list)) else (loc.fs.protocol,)
    if "s3" in protocols:
        _probe_s3_write(loc, bucket)
        return
    with storage_errors(loc.url):
        exists = loc.fs.exists(bucket)
    if not exists:
        raise missing_bucket(loc, bucket)


def _probe_s3_write(loc: Location, bucket: str) -> None:
    prefix = loc.root.strip("/").split("/", 1)[1] if "/" in loc.root.strip("/") else ""
    key = (prefix.rstrip("/") + "/" if prefix else "") + PROBE_PREFIX + uuid.uuid4().hex[:12]
    extra = dict(getattr(loc.fs, "req_kw", None) or {})  # requester-pays buckets
    with storage_errors(loc.url):
        try:
            upload = loc.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, **extra)
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise missing_bucket(loc, bucket) from None
            raise
    try:
        loc.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"], **extra)
    except Exception:  # noqa: BLE001 - no object exists either way; a lifecycle rule expires the upload
        pass


def _check_local(loc: Location) -> None:
    path = os.path.abspath(loc.root)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        raise StorageError(f"{loc.url}: {path} is a file, not a directory; choose a directory for DEST")
    if not os.access(path, os.W_OK | os.X_OK):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise StorageError(f"{loc.url}: {path} is on a read-only filesystem; choose a writable DEST")
        raise StorageError(f"{loc.url}: {path} is not writable by this user; choose a location you can "
                           "write, or fix its permissions")
    if path == os.path.abspath(loc.root):
        from ckptflow.storage.lock import check_lock_file

        check_lock_file(loc)  # a link at the lock's name: refused here, in a second, not after Prefect starts

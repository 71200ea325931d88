"""Every S3 request has a time limit: a silent endpoint ends a run with one line, never a hang.

botocore's timeouts do not bound a call to an endpoint that stops answering:
- aiohttp starts `read_timeout` (its `sock_read`) only once the request body is fully written.
  A body the endpoint no longer reads (an `upload_part` of 5 MiB and more, a large `put_object`)
  fills the socket buffers and then waits with no limit at all: a SIGSTOPped endpoint held a
  shard in `upload_part` or in `S3File.commit` (its last part, then CompleteMultipartUpload) for
  as long as the outage lasted (380 s and counting, measured).
- The layers multiply. botocore's attempts run inside each of s3fs's `_call_s3` attempts, and
  s3fs wraps range reads and `cat_file` in a second retry loop of its own around `_call_s3`:
  2 × 2 × 2 attempts of 8 s plus backoff: issue #28 measured 67–80 s for one read, and with
  Prefect's shard retries (`ckptflow.storage.transient`) on top, 4 min 48 s.

So every S3 API call of a filesystem `open_location` hands out runs under one deadline that
covers its retries: `DEADLINE_S` (or `connect + read` timeouts where a user raised them) plus the
request body at `MIN_BYTES_PER_S`. On expiry the call is cancelled (aiohttp drops the connection)
and raises `EndpointSilent`, a `StorageError`: s3fs does not retry it (not among its retryable
errors), Prefect does not (`is_transient` says no), and the CLI prints it as one `error:` line.

After one, the filesystem fails every call at once, with the same message, for `SILENT_HOLD_S`.
Measured before that rule, with only a shorter limit for later calls: each shard still queued
ran and failed in turn, and Prefect's record of each failure waited too (its result storage's
makedirs: HeadBucket, GetBucketLocation, CreateBucket; fsspec hands it this same cached
filesystem, its options being ours), about 20 s a shard: a checkpoint of 163 shards would have
taken an hour to fail. Cleanup that cannot reach the endpoint is lost either way: a pending
multipart upload stays until the bucket's lifecycle rule, and DEST's lock until it is stale or a
run on this machine sees that its holder is gone (`ckptflow.storage.lock`).

`CKPTFLOW_S3_DEADLINE_S` replaces `DEADLINE_S` (a slow endpoint; tests that want it short).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from typing import Any

from fsspec.asyn import sync_wrapper

from ckptflow.storage.urls import StorageError

DEADLINE_S = 30.0               # one call, retries included: ~2 full attempts at the default timeouts
MIN_BYTES_PER_S = 2 << 20       # a request body slower than this counts as a stall (50 MiB part: +25 s)
SILENT_HOLD_S = 60.0            # after an expiry, calls fail at once for this long (then try again)
ENV = "CKPTFLOW_S3_DEADLINE_S"


class EndpointSilent(StorageError):
    """An S3 call got no answer before its deadline, its retries included."""


def base_deadline(fs: Any) -> float:
    """Seconds one call without a body may take: the env override, else `DEADLINE_S`, raised to
    one full attempt (connect + read timeouts) where a user's `config_kwargs` ask for longer."""
    text = os.environ.get(ENV)
    if text:
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if not value > 0:
            raise StorageError(f"{ENV} must be a number of seconds above 0; got {text!r}")
        return value
    config = getattr(fs, "config_kwargs", None) or {}
    attempt = float(config.get("connect_timeout") or 0) + float(config.get("read_timeout") or 0)
    return max(DEADLINE_S, attempt)


def body_size(body: Any) -> int:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return memoryview(body).nbytes
    if isinstance(body, io.BytesIO):
        return body.getbuffer().nbytes
    return 0


def bound_s3_calls(fs: Any) -> None:
    """Give every `_call_s3` of this s3fs instance (its sync `call_s3` too, which S3File uses) the
    deadline described above. Idempotent: fsspec hands the same cached instance out again."""
    if getattr(fs, "_ckptflow_deadline", None) is not None:
        return
    fs._ckptflow_deadline = base_deadline(fs)
    fs._ckptflow_silent = None  # (monotonic time it ends, the message) after an expiry
    unbounded = type(fs)._call_s3  # the class's coroutine function, retries included

    async def call_s3(method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        silent = fs._ckptflow_silent
        if silent is not None and time.monotonic() < silent[0]:
            raise EndpointSilent(silent[1])
        limit = fs._ckptflow_deadline + body_size(kwargs.get("Body")) / MIN_BYTES_PER_S
        call = asyncio.ensure_future(unbounded(fs, method, *akwarglist, **kwargs))
        try:
            done, _ = await asyncio.wait({call}, timeout=limit)
        except asyncio.CancelledError:  # our caller gave up (fsspec's own timeout): so do we
            call.cancel()
            raise
        if not done:
            call.cancel()
            with contextlib.suppress(Exception):  # cancelling closes the connection; do not wait long
                await asyncio.wait({call}, timeout=1)
            error = silent_error(fs, method, kwargs, limit)
            fs._ckptflow_silent = (time.monotonic() + SILENT_HOLD_S, str(error))
            raise error
        fs._ckptflow_silent = None  # an answer, even an error answer: the endpoint is up
        return call.result()

    fs._call_s3 = call_s3
    fs.call_s3 = sync_wrapper(call_s3, obj=fs)


def silent_error(fs: Any, method: str, kwargs: dict[str, Any], limit: float) -> EndpointSilent:
    client = getattr(fs, "_s3", None)
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "(the default AWS endpoint)"
    what = method
    if kwargs.get("Bucket"):
        what += f" of s3://{kwargs['Bucket']}" + (f"/{kwargs['Key']}" if kwargs.get("Key") else "")
    return EndpointSilent(f"S3 endpoint {endpoint} did not answer within {limit:.0f} s ({what}); "
                          "check it is up, then rerun: committed shards are kept")

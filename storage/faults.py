"""Environment failures (storage, credentials, network, disk) as one line a user can act on.

`explain(exc)` is what the CLI calls for an exception that is not a `UserError`: it returns the
one-line message, or None when the exception is a bug (which then shows its traceback).
`storage_errors(url)` turns the same failures into a `StorageError` naming the URL the user gave,
around the first request a command makes to a location.

Pure: it reads exceptions, never the network. botocore and aiohttp are matched by class name so
this module imports neither.
"""
from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or choose another DEST, then run again to resume",
    errno.EDQUOT: "disk quota exceeded; free space or choose another DEST, then run again to resume",
    errno.EROFS: "the filesystem is read-only; choose a writable DEST",
    errno.EACCES: "permission denied; choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write, or fix its permissions",
    errno.ENOTDIR: "a path component is a file, not a directory; choose a directory",
    errno.EISDIR: "is a directory where a file was expected",
}
_NET_ADVICE = {
    errno.ECONNREFUSED: "connection refused; check the endpoint URL and that the service is running",
    errno.ETIMEDOUT: "the connection timed out; check the endpoint URL and the network",
    errno.EHOSTUNREACH: "host unreachable; check the endpoint URL and the network",
    errno.ENETUNREACH: "network unreachable; check the network",
}
_CHECK_ENDPOINT = ("check the endpoint (--storage-options client_kwargs.endpoint_url, AWS_ENDPOINT_URL "
                   "or FSSPEC_S3_ENDPOINT_URL) and that the service is up")
_SET_CREDENTIALS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                    "--storage-options '{\"key\": \"...\", \"secret\": \"...\"}' "
                    "('{\"anon\": true}' for a public bucket)")
_BAD_KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "InvalidClientTokenId",
                  "UnrecognizedClientException", "AuthFailure"}
_EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _chain(exc: BaseException | None) -> list[BaseException]:
    """The exception, its causes and contexts, and the members of exception groups (Prefect and
    anyio raise those), outermost first."""
    out: list[BaseException] = []
    todo = [exc] if exc is not None else []
    while todo and len(out) < 32:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo.extend(getattr(e, "exceptions", None) or ())
        todo.append(e.__cause__ or e.__context__)
    return out


def _endpoint(exc: BaseException) -> str:
    """The URL botocore names in its connection errors, without the query string."""
    kwargs = getattr(exc, "kwargs", None)
    url = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    if not url and "ClientConnectorError" in _names(exc):
        url = f"{getattr(exc, 'host', '?')}:{getattr(exc, 'port', '?')}"
    return str(url).split("?", 1)[0] if url else "the endpoint"


def _client_error(exc: BaseException) -> tuple[str, str] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or not isinstance(response.get("Error"), dict):
        return None
    error = response["Error"]
    code = str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    message = str(error.get("Message") or "").strip().splitlines()[0] if error.get("Message") else ""
    bucket = error.get("BucketName")
    where = f"s3://{bucket}" + (f"/{error['Key']}" if error.get("Key") else "") if bucket else ""
    operation = getattr(exc, "operation_name", "") or "a request"
    if code == "NoSuchBucket" or (code == "404" and operation == "HeadBucket"):
        name = f"bucket {bucket!r}" if bucket else "the bucket"
        return where, f"{name} does not exist; check the bucket name and the endpoint (ckptflow never creates buckets)"
    if code in _BAD_KEY_CODES:
        return where, (f"the storage rejected the credentials ({code}: {message or 'invalid key or secret'}); "
                       f"{_SET_CREDENTIALS}")
    if code in _EXPIRED_CODES:
        return where, (f"the credentials have expired ({code}); refresh them (aws sso login, a new session token) "
                       "and run again")
    if code in _DENIED_CODES:
        return where, (f"access denied ({operation}); these credentials may not do this here: check the bucket "
                       f"policy or IAM permissions, or {_SET_CREDENTIALS}")
    if code in _REGION_CODES:
        return where, (f"wrong region for this bucket ({code}: {message}); "
                       "set client_kwargs.region_name or AWS_DEFAULT_REGION")
    if code in ("NoSuchKey", "404"):
        return None  # a missing file: the caller names it (or it is ours to fix)
    return where, f"the storage refused {operation}: {code}{': ' + message if message else ''}"


def describe(exc: BaseException | None) -> tuple[str, str] | None:
    """(where the exception says it happened or "", what to do) for an environment failure."""
    chain = _chain(exc)
    for e in chain:  # the most specific first: botocore's own errors under s3fs's translations
        names = _names(e)
        if "NoCredentialsError" in names:
            return "", f"no storage credentials found; {_SET_CREDENTIALS}"
        if "PartialCredentialsError" in names:
            return "", f"incomplete credentials ({e}); {_SET_CREDENTIALS}"
        if "ClientError" in names:
            found = _client_error(e)
            if found:
                return found
            continue
        if "ConnectTimeoutError" in names:
            return "", f"connecting to {_endpoint(e)} timed out; {_CHECK_ENDPOINT}"
        if names & {"ReadTimeoutError", "ServerTimeoutError", "FSTimeoutError"}:
            return "", (f"{_endpoint(e)} accepted the connection but did not answer in time (timed out); "
                        f"{_CHECK_ENDPOINT}, or raise config_kwargs.read_timeout for a slow one")
        if names & {"EndpointConnectionError", "ClientConnectorError"}:
            reason = next((_NET_ADVICE[x.errno].split(";")[0] for x in chain
                           if isinstance(x, OSError) and x.errno in _NET_ADVICE), "connection failed")
            return "", f"cannot connect to {_endpoint(e)} ({reason}); {_CHECK_ENDPOINT}"
        if names & {"NoRegionError", "ProfileNotFound", "ParamValidationError", "InvalidRegionError",
                    "CredentialRetrievalError", "TokenRetrievalError", "SSOTokenLoadError", "InvalidConfigError"}:
            return "", " ".join(str(e).split())  # botocore's own text already says what to set
    for e in chain:
        if isinstance(e, OSError) and e.errno in _OS_ADVICE:
            return str(e.filename or ""), _OS_ADVICE[e.errno]
        if isinstance(e, OSError) and e.errno in _NET_ADVICE:
            return "", _NET_ADVICE[e.errno]
    for e in chain:  # s3fs's translation of a 403 without a recognised code underneath
        if type(e) is PermissionError:
            detail = " ".join(str(e).split()) or "permission denied"
            return str(e.filename or ""), f"access denied ({detail}); check the credentials and permissions"
        if isinstance(e, TimeoutError) or "TimeoutError" in _names(e):
            detail = " ".join(str(e).split())
            return "", f"timed out{f' ({detail})' if detail else ''}; {_CHECK_ENDPOINT}"
    return None


def explain(exc: BaseException) -> str | None:
    """One line for an environment failure, naming the path or URL; None for anything else."""
    found = describe(exc)
    if found is None:
        return None
    where, advice = found
    return f"{where}: {advice}" if where else advice


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Inside: an environment failure becomes `StorageError("<url>: <what to do>")`, chained to the
    original (so `ckptflow.storage.transient` still sees a timeout as one); anything else passes through."""
    from ckptflow.storage.errors import UserError
    from ckptflow.storage.urls import StorageError

    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        found = describe(exc)
        if found is None:
            raise
        raise StorageError(f"{url}: {found[1]}") from exc


def is_missing_bucket(exc: BaseException) -> bool:
    """s3fs reports a missing bucket and a missing key both as FileNotFoundError; this tells them apart."""
    for e in _chain(exc):
        response: Any = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = str(response["Error"].get("Code"))
            return code == "NoSuchBucket" or (code == "404" and getattr(e, "operation_name", "") == "HeadBucket")
    return False

"""s3fs options: checked before any request, and bounded timeouts and retries by default.

s3fs takes any keyword and only fails on the first request, deep in aiobotocore, with an
`AttributeError` or a `TypeError` about `AioSession`; here a wrong name or type is one line
naming the option. The defaults bound what a dead endpoint costs each attempt. Out of the box, an
endpoint that accepts the connection and never answers is waited on 15 s per attempt, 5 botocore
attempts per s3fs attempt and 5 s3fs attempts: about 7 minutes for the first listing. With these
values one attempt waits 8 s for an answer, and botocore and s3fs each keep one retry, because
each catches something the other cannot: botocore retries throttling, 5xx answers and resets
before a response; s3fs retries a body cut off mid-read, which botocore has already handed over.

These timeouts alone do not bound a call (measured with moto SIGSTOPped): s3fs retries range
reads in a second loop around its own, so one read took 67–80 s (issue #28), not the
2 × 2 × 8 s = 34 s this docstring used to promise; Prefect's shard retries ran that four times
(4 min 48 s); and aiohttp
starts the read timeout only once a request body is written, so an upload part the endpoint
stopped reading waited without limit (still waiting after 380 s). `ckptflow.storage.deadline`
therefore gives every call one deadline over all of these retries: 30 s, plus the body at 2 MiB/s.
Measured with its defaults: a listing against a silent endpoint ends in 33 s; a run whose
endpoint stops in a shard's upload part ends 38–46 s later, one whose endpoint stops in a
CompleteMultipartUpload ends 36 s later, each with one `error:` line.

A user's own `config_kwargs` values win, key by key. So do `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE`
in the environment (botocore would otherwise let our explicit `retries` override them).
"""
from __future__ import annotations

import os
from typing import Any

CONNECT_TIMEOUT_S = 5   # s3fs's own default; an unreachable host fails in 2 × 5 s
READ_TIMEOUT_S = 8      # server silence after the request is sent (aiohttp starts it then)
BOTOCORE_ATTEMPTS = 2   # in all, first try included ("max_attempts" would count retries only)
RETRIES = 2             # s3fs's own attempts per call (its default is 5)

_DICT_OPTIONS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")
_BOOL_OPTIONS = ("anon", "use_ssl", "requester_pays", "version_aware", "cache_regions",
                 "skip_instance_cache", "use_listings_cache", "fixed_upload_size", "asynchronous")
_STR_OPTIONS = ("key", "secret", "token", "endpoint_url", "username", "password", "profile")
# Keywords fsspec's base class and its instance cache take, and the ones s3fs hands to AioSession.
_BASE_OPTIONS = ("skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
                 "session_vars", "event_hooks", "include_builtin_handlers", "profile")
# What s3fs passes on to `AioSession.create_client(**client_kwargs)`.
_CLIENT_OPTIONS = ("region_name", "api_version", "use_ssl", "verify", "endpoint_url", "aws_access_key_id",
                   "aws_secret_access_key", "aws_session_token", "config", "aws_account_id")


def _known_options() -> set[str]:
    import inspect

    from s3fs import S3FileSystem

    params = inspect.signature(S3FileSystem.__init__).parameters
    return {p for p, v in params.items() if v.kind is v.POSITIONAL_OR_KEYWORD and p != "self"} | set(_BASE_OPTIONS)


def check_s3_options(url: str, options: dict[str, Any]) -> None:
    """Raise `StorageError` naming the first option s3fs would choke on at its first request."""
    from botocore.config import Config

    from ckptflow.storage.urls import StorageError

    def bad(what: str) -> StorageError:
        return StorageError(f"{url}: --storage-options {what}")

    known = _known_options()
    for name, value in options.items():
        if name not in known:
            raise bad(f"has no option {name!r} for s3:// (s3fs); known options include "
                      "key, secret, token, anon, endpoint_url, client_kwargs, config_kwargs, profile")
        if name in _DICT_OPTIONS and value is not None and not isinstance(value, dict):
            raise bad(f"{name} must be a JSON object, e.g. {name}: {{...}}; got {value!r}")
        if name in _BOOL_OPTIONS and value is not None and not isinstance(value, bool):
            raise bad(f"{name} must be true or false; got {value!r}")
        if name in _STR_OPTIONS and value is not None and not isinstance(value, str):
            raise bad(f"{name} must be a string; got {value!r}")
    client = options.get("client_kwargs") or {}
    for name, value in client.items():
        if name not in _CLIENT_OPTIONS:
            raise bad(f"client_kwargs has no option {name!r}; botocore's create_client takes "
                      + ", ".join(_CLIENT_OPTIONS))
    endpoint = client.get("endpoint_url", options.get("endpoint_url"))
    if endpoint is not None and not (isinstance(endpoint, str) and endpoint.startswith(("http://", "https://"))):
        raise bad(f"endpoint_url must be an http:// or https:// URL; got {endpoint!r}")
    config = options.get("config_kwargs") or {}
    for name in ("connect_timeout", "read_timeout"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise bad(f"config_kwargs.{name} must be a number of seconds above 0; got {value!r}")
    if "retries" in config and not isinstance(config["retries"], dict):
        raise bad(f'config_kwargs.retries must be a JSON object, e.g. {{"max_attempts": 3, "mode": "standard"}}; '
                  f"got {config['retries']!r}")
    try:
        Config(**config)
    except (TypeError, ValueError) as exc:
        raise bad(f"config_kwargs is not a valid botocore Config: {exc}") from None


def with_s3_defaults(options: dict[str, Any], configured: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` with bounded timeouts and retries filled in where neither the user's options nor
    fsspec's configuration (`configured`, e.g. from FSSPEC_S3_CONFIG_KWARGS) set them."""
    out = dict(options)
    base = out.get("config_kwargs")
    if base is None:
        base = (configured or {}).get("config_kwargs")
    config = dict(base) if isinstance(base, dict) else {}
    config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", READ_TIMEOUT_S)
    if not ({"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & os.environ.keys()):
        config.setdefault("retries", {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"})
    out["config_kwargs"] = config
    return out


def bound_s3fs_retries(fs: Any) -> None:
    """s3fs takes no `retries` option: its attempts are a class attribute (5). Fewer here, on the
    instance; a lower class value (a test or a user turning retries off) is kept."""
    if "retries" not in vars(fs):
        fs.retries = min(type(fs).retries, RETRIES)

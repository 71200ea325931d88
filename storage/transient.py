"""Which storage errors are worth a retry: throttling, timeouts, dropped connections.

User errors (missing files, bad headers, wrong shapes) are never transient: retrying them only
delays the message the user needs.
"""
from __future__ import annotations

import errno
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_TRANSIENT_NAMES = {
    "ConnectionError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
    "TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
    "IncompleteReadError", "ResponseStreamingError", "ServerTimeoutError",
}
# A call that hit its deadline (`ckptflow.storage.deadline`) already spent its retries on a silent
# endpoint: running the task again would only make the user wait that long once more.
_NEVER_NAMES = {"EndpointSilent"}
_TRANSIENT_WORDS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "503 Service", "Connection reset", "Connection was closed")


def is_transient(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ in _NEVER_NAMES:
            return False
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
            return True
        text = str(exc)
        if any(w in text for w in _TRANSIENT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure is a storage hiccup."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


# Every Prefect task that touches storage retries a hiccup alike: three more tries, backing off.
TRANSIENT_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [1, 4, 15],
                                     "retry_condition_fn": retry_transient}


def with_transient_retries(call: Callable[[], T], delays: tuple[float, ...] = (1, 4, 15)) -> T:
    """`call()`, tried again after each of `delays` while it fails with a storage hiccup: what a
    Prefect task gets from `TRANSIENT_RETRIES`, for reads made outside any task (planning)."""
    for delay in delays:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a hiccup
            if not is_transient(exc):
                raise
        time.sleep(delay)
    return call()

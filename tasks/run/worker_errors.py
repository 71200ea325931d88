"""A shard task that fails on another process says which one.

On a cluster, "no storage credentials found" from a shard task is about one worker machine,
while the CLI that prints it runs on another that has them. When a task runs in a process other
than its flow's (a Dask worker, a process pool: Prefect hydrates the flow run context there as
`detached`), its user-facing error — a `UserError`, or an environment failure the CLI explains in
one line (`storage.faults.explain`) — goes back as a `UserError` whose first line starts with
`on worker HOST:PID:`. Anything else is a bug and goes back unchanged, traceback and all.

The new error is made from the message alone: plain pickle rebuilds an exception as
`cls(*args)`, which a class whose constructor takes more than a message (`HeaderError(file,
reason)`) refuses on the flow's side.
The original stays its `__cause__` in the worker, where Prefect's retry condition reads it
(`storage.transient.is_transient`); causes are not pickled, so it never travels.
"""
from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from ckptflow.storage.errors import UserError
from ckptflow.storage.faults import explain

F = TypeVar("F", bound=Callable[..., Any])


def worker_id() -> str:
    """host:pid, as shard records and journal entries name the process that wrote a shard."""
    return f"{socket.gethostname()}:{os.getpid()}"


def away_from_flow() -> bool:
    """Is this task running in a process other than its flow run's?"""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx is not None and ctx.detached)


def on_worker(exc: BaseException, worker: str) -> UserError | None:
    """`exc` as a user error naming `worker`, or None when it is a bug (not ours to rephrase)."""
    text = str(exc) if isinstance(exc, UserError) else explain(exc)
    if text is None:
        return None
    first, *rest = text.splitlines() or [type(exc).__name__]
    message = "\n".join([f"on worker {worker}: {first}", *rest])
    if isinstance(exc, UserError):
        try:  # keep the class where it is rebuilt from the message alone (StorageError, LockLost, …)
            same = type(exc)(message)
        except TypeError:  # HeaderError(file, reason), DestBusy(dst, holder, when), …
            same = None
        if same is not None and str(same) == message:
            return same
    return UserError(message)


def names_the_worker(fn: F) -> F:
    """Wrap a task's function (under `@task`) so its user-facing errors name a remote worker."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            named = on_worker(exc, worker_id()) if away_from_flow() else None
            if named is None:
                raise
            raise named from exc

    return run  # type: ignore[return-value]

"""How the engine runs shard work: a `Submitter` turns one `ShardCall` into a future.

The engine only needs `submit` and `as_completed` (and calls `note_reused(stage, [(file, record)])`,
where a submitter has it, with the shards the journal proved committed and that it will not
submit); what runs the call is the caller's choice:
`SerialSubmitter` (in this thread, as submitted), `ThreadSubmitter` (a thread pool), or the
flows' Prefect submitter (a Prefect task on the flow run's task runner: threads, processes, Dask).
Futures answer `.result()`, which raises the call's exception.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ckptflow.tasks.plan.model import ShardPlan


@dataclass(frozen=True)
class ShardCall:
    """The arguments of one `run_shard` (small: URLs, a plan, fingerprints; never tensors)."""

    stage: str
    shard: ShardPlan
    source: str
    dest: str
    fingerprints: list[tuple[str, int, str | None]]
    storage_options: dict[str, Any] | None
    digest: bool
    device: str
    backend: str
    journal: str

    def args(self) -> tuple[Any, ...]:
        return (self.stage, self.shard, self.source, self.dest, self.fingerprints, self.storage_options,
                self.digest, self.device, self.backend, self.journal)


class Submitter(Protocol):
    def submit(self, call: ShardCall) -> Any: ...

    def as_completed(self, futures: list[Any]) -> Iterable[Any]: ...


class SerialSubmitter:
    """Runs each call as it is submitted, in this thread; the future holds its outcome."""

    def submit(self, call: ShardCall) -> cf.Future:
        from ckptflow.tasks.run.shard import run_shard

        fut: cf.Future = cf.Future()
        try:
            fut.set_result(run_shard(*call.args()))
        except Exception as exc:  # noqa: BLE001 - handed to the engine through the future
            fut.set_exception(exc)
        return fut

    def as_completed(self, futures: list[Any]) -> Iterator[Any]:
        return iter(futures)


class ThreadSubmitter:
    """A pool of `max_workers` threads (object stores: shards wait on I/O more than on CPU)."""

    def __init__(self, max_workers: int = 2) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ckptflow-shard")

    def submit(self, call: ShardCall) -> cf.Future:
        from ckptflow.tasks.run.shard import run_shard

        # In a copy of this context: the shard counts its bytes on its own conversion's sink
        # (`ckptflow.tasks.run.progress`), as in Prefect's thread task runner.
        return self._pool.submit(contextvars.copy_context().run, run_shard, *call.args())

    def as_completed(self, futures: list[Any]) -> Iterator[Any]:
        return cf.as_completed(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

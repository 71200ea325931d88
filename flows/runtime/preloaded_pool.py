"""Process-pool workers forked from one process that has imported their modules.

Prefect's `ProcessPoolTaskRunner` spawns each worker: a fresh interpreter that imports torch,
Prefect and ckptflow before its first shard, about 3.5 CPU-seconds and 195 MB of memory of its own
per worker. Here the workers come from a multiprocessing fork server that imported those modules
once (`PRELOAD`): each worker is a fork of it, ready at once, sharing the imported modules' pages
(`bench/bench_worker_start.py`, 4 workers on 2 cores: ready in 2.1-2.3 s, not 7.3-7.6 s; 4-5 MB
of memory of their own each, not 195).
The fork server is started fresh by Python (an `exec`, not a fork of this process), so no thread,
lock or CUDA context of this process reaches a worker; it lives as long as this process and serves
every pool made here.

Each task still gets this process's environment and Prefect settings with it, as with a spawned
worker (Prefect sends both along; a variable unset here after the server started stays set
there). Where `forkserver` is not a start method (Windows), or Prefect's pool no longer looks as
this was written against, the pool stays Prefect's own.
"""
from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner

# What a shard task's worker imports anyway: the task (Prefect, ckptflow's planner and executor),
# torch for its kernels, and Prefect's task engine that runs it.
PRELOAD = ["torch", "prefect.task_engine", "ckptflow.tasks.run.shard_task", "ckptflow.tasks.run.execute"]


def fork_server_context() -> Any | None:
    """The `forkserver` context, its server set to import `PRELOAD`; None where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first pool's first worker
    return ctx


def ignore_ctrl_c() -> None:
    """A worker's initializer under the CLI: Ctrl-C reaches every process of the terminal's group,
    and Prefect's engine in each worker would log the KeyboardInterrupt's traceback over the CLI's
    one line. The CLI handles it for the run (flows/runtime/interrupt.py: one line, locks released,
    exit); its orphan watchdog then ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PreloadedProcessPool(ProcessPoolTaskRunner):
    """`ProcessPoolTaskRunner` whose workers fork from a preloaded server instead of spawning."""

    def __enter__(self) -> "PreloadedProcessPool":
        super().__enter__()
        spawning, ctx = self._executor, fork_server_context()
        initializer, initargs = getattr(spawning, "_initializer", None), getattr(spawning, "_initargs", None)
        if ctx is None or initializer is None or initargs is None:
            return self
        # No worker has started yet (a pool starts them on its first submit): the same pool, forking.
        self._executor = ProcessPoolExecutor(max_workers=self._max_workers, mp_context=ctx,
                                             initializer=initializer, initargs=initargs)
        spawning.shutdown(wait=False)
        return self

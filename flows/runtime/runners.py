"""Where shard tasks run: threads in this process, a process pool, or a Dask cluster.

`make_task_runner(kind, max_workers, dask_address)` builds the Prefect task runner for
`convert_flow.with_options(task_runner=...)`. Every runner writes the same bytes: a shard task
takes URLs and a plan, and returns a small JSON record, so any process on any machine that
reaches the storage and the Prefect API can run it.

Multi-process runners need a Prefect server every process talks to: without one, each worker
process would start its own temporary SQLite-backed server, and the workers' task runs, cache
records and concurrency limits would not be shared. With no `PREFECT_API_URL`, local workers
(a process pool, a Dask LocalCluster) are given the temporary server this process starts anyway:
the run's `Server.share_with_workers` starts it before the workers and exports its URL, which
they inherit. (A CLI run has already exported the URL of its own server, flows/runtime/server.py.) A remote Dask
cluster cannot reach a server on this machine's loopback: it needs a real one.
"""
from __future__ import annotations

import os
from typing import Any

from ckptflow.storage.errors import UserError

from ckptflow.flows.runtime.server import Server

RUNNERS = ("threads", "processes", "dask")

# Shard tasks carry this tag, so a Prefect tag concurrency limit can cap them across every
# worker (`prefect concurrency-limit create ckptflow-shard 4`); GPU runs also carry GPU_TAG.
SHARD_TAG = "ckptflow-shard"
GPU_TAG = "ckptflow-gpu"


class RunnerError(UserError):
    """A task runner that cannot work as asked (unknown kind, no Prefect server, no dask)."""


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL") or None


def prestart_for(server: Server, owns_process: bool, kind: str, dask_address: str | None) -> None:
    """A CLI run's server, started early (it boots while torch and the flow import), and its task
    runner checked before them. No temporary server for `--dask-address`: the remote workers could
    not reach its loopback URL, so the run is refused here unless Prefect's settings name a server
    (seconds of start-up for nothing)."""
    server.prestart(temporary=owns_process and not dask_address)
    check_runner(kind, dask_address, server)


def check_runner(kind: str, dask_address: str | None = None, server: Server | None = None) -> None:
    """Raise a `RunnerError` saying what to do when `kind` cannot run here (`server`: the run's)."""
    if kind not in RUNNERS:
        raise RunnerError(f"unknown task runner {kind!r}; choose one of: {', '.join(RUNNERS)}")
    if dask_address and kind != "dask":
        raise RunnerError(f"--dask-address is for --task-runner dask, not {kind!r}")
    owned = server is not None and server.owned()
    if kind != "threads" and dask_address and (not api_url() or owned):
        raise RunnerError(
            "--dask-address runs shard tasks on another cluster, whose workers must all talk to one "
            "Prefect server they can reach; start one (`prefect server start --host 0.0.0.0`) and "
            "`export PREFECT_API_URL=http://HOST:4200/api` here and on the workers, or drop --dask-address "
            "to use a LocalCluster")
    if kind == "dask":
        try:
            import prefect_dask  # noqa: F401
        except ImportError as exc:
            raise RunnerError("--task-runner dask needs prefect-dask: pip install 'ckptflow[dask]'") from exc


def make_task_runner(kind: str = "threads", max_workers: int | None = None,
                     dask_address: str | None = None, server: Server | None = None,
                     cli_interrupt: bool = False) -> Any:
    """The Prefect task runner for `kind` ("threads" | "processes" | "dask").

    threads:   `ThreadPoolTaskRunner(max_workers)` (default 1: a CPU shard task already uses
               every core through torch; raise it for object storage, where tasks wait on I/O).
    processes: `ProcessPoolTaskRunner(max_workers)`: processes on this machine, forked from one
               that imported the shard task's modules once (`preloaded_pool`).
    dask:      `DaskTaskRunner(address=dask_address)` for an existing cluster, else a
               `distributed.LocalCluster` of `max_workers` single-threaded worker processes,
               spawned (forked from the pool's preloaded server, where Prefect sets up logging
               before Dask does, their Dask INFO logs reached the terminal).
    `cli_interrupt`: the CLI handles Ctrl-C for the run and reaps its workers
    (`Runtime.handles_ctrl_c`): pool workers leave Ctrl-C to it (`preloaded_pool.ignore_ctrl_c`).
    """
    check_runner(kind, dask_address, server)
    if kind != "threads" and not api_url():
        (server or Server()).share_with_workers()
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or 1)
    if kind == "processes":
        from ckptflow.flows.runtime.preloaded_pool import PreloadedProcessPool, ignore_ctrl_c

        return PreloadedProcessPool(max_workers=max_workers or 2, initializer=ignore_ctrl_c if cli_interrupt else None)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": max_workers or 2, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def runner_kind(runner: Any) -> str | None:
    """The kind a task runner instance is, or None for one ckptflow did not make."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if isinstance(runner, ThreadPoolTaskRunner):
        return "threads"
    if isinstance(runner, ProcessPoolTaskRunner):
        return "processes"
    return "dask" if type(runner).__name__ == "DaskTaskRunner" else None


def runner_settings(runner: Any) -> tuple[str | None, int | None, str | None]:
    """(kind, workers, scheduler address) of a task runner: two runners with the same settings
    run shard tasks the same way."""
    kind = runner_kind(runner)
    if kind in ("threads", "processes"):
        return kind, getattr(runner, "_max_workers", None), None
    if kind == "dask":
        workers = (getattr(runner, "cluster_kwargs", None) or {}).get("n_workers")
        return kind, workers, getattr(runner, "address", None)
    return None, None, None

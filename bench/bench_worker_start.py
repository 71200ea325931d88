"""Local worker start-up: a process pool whose workers fork from a preloaded fork server
(`flows/runtime/preloaded_pool.py`) against Prefect's spawned workers, same run, same machine.

Each worker imports what a shard task's worker imports (torch, Prefect's task engine, the shard
task) and reports its memory of its own (Private_* of /proc/self/smaps_rollup). The baseline is
a `spawn` pool (Prefect's own). Printed: seconds until every worker has its modules, the ratio,
and MB of private memory per worker.

    python bench/bench_worker_start.py [--workers 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptflow.flows.runtime.preloaded_pool import PRELOAD, fork_server_context  # noqa: E402


def ready(_: int) -> int:
    """In a worker: import what a shard task imports; its private memory in MB."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    time.sleep(0.3)  # every worker of the pool gets one call
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty"))) // 1024


def start(ctx, workers: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        private = list(pool.map(ready, range(workers)))
    return time.perf_counter() - t0 - 0.3, private


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    spawned, spawn_mb = start(multiprocessing.get_context("spawn"), args.workers)
    forked, fork_mb = start(fork_server_context(), args.workers)  # includes the fork server's own start
    again, _ = start(fork_server_context(), args.workers)  # a second pool in the same process
    print(f"{args.workers} workers ready: spawned {spawned:.2f} s, forked {forked:.2f} s "
          f"({spawned / forked:.1f}x; a second pool {again:.2f} s)")
    print(f"private memory per worker: spawned {max(spawn_mb)} MB, forked {max(fork_mb)} MB")


if __name__ == "__main__":
    main()

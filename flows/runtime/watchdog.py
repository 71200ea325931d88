"""No orphans: the processes the CLI starts die with it, however it dies.

Prefect's temporary server, process-pool workers and a Dask LocalCluster are children (or
grandchildren) of the CLI. When the CLI is SIGKILLed alone — as the OOM killer does — they are
re-parented to PID 1 and live on. `start()` spawns a small watcher process that notes every
descendant of the CLI as it appears and, once the CLI is gone, kills each one still alive (the
start time read from /proc guards against a recycled PID). The watcher imports nothing heavy
and exits with the CLI. Linux only (/proc); elsewhere `start()` does nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks after boot) of `pid` from /proc, or None once it is
    gone. The start time tells a process from a later one that got the same PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
    return int(fields[1]), fields[19]


def _descendants(root: int, known: dict[int, str]) -> None:
    """Add to `known` (pid → start time) every process whose parent is `root` or in `known`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in known or int(entry) == os.getpid():
            continue
        st = proc_stat(int(entry))
        if st is not None and (st[0] == root or st[0] in known):
            known[int(entry)] = st[1]


def watch(root: int) -> None:
    """Run in the watcher: poll until `root` is gone, then kill what it left behind."""
    known: dict[int, str] = {}
    while os.getppid() == root:
        for _ in range(3):  # a chain (server → its workers) may appear within one poll
            count = len(known)
            _descendants(root, known)
            if len(known) == count:
                break
        time.sleep(POLL_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid, started in known.items() if (proc_stat(pid) or (0, None))[1] == started]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not alive:
            return
        time.sleep(2.0)


def start() -> subprocess.Popen | None:
    """Spawn the watcher for this process; None where /proc is not there."""
    if not os.path.isdir("/proc/self") or os.environ.get("CKPTFLOW_NO_WATCHDOG"):
        return None
    return subprocess.Popen([sys.executable, "-S", __file__, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # Ctrl-C in the terminal is the CLI's, not its


if __name__ == "__main__":
    watch(int(sys.argv[1]))

"""What the local and the object-store DEST locks share: the lock's name, its holder record,
its timing limits and the errors a user sees."""
from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from typing import Callable

from ckptflow.storage.urls import Location, StorageError

LOCK_NAME = ".ckptflow.lock"
HEARTBEAT_S = 20.0
STALE_S = 90.0
# Tests (and users on stores with slow clocks) shorten or lengthen the lease without code changes.
STALE_ENV, HEARTBEAT_ENV = "CKPTFLOW_LOCK_STALE_S", "CKPTFLOW_LOCK_HEARTBEAT_S"


class DestBusy(StorageError):
    """Another live run holds DEST's lock."""

    def __init__(self, dst: Location, holder: dict[str, object] | None, when: str):
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
               if holder else "holder unknown: its lock cannot be read")
        super().__init__(f"DEST {dst.url} is being written by another ckptflow run ({who}); {when}: wait for "
                         "it to finish, or choose another DEST")


class LockLost(StorageError):
    """This run's object-store lock was taken over (or could not be refreshed): it must stop."""


def limits() -> tuple[float, float]:
    """(stale after, heartbeat every) in seconds: `STALE_S`/`HEARTBEAT_S`, or the environment's."""
    stale = _seconds(STALE_ENV, STALE_S)
    beat = _seconds(HEARTBEAT_ENV, min(HEARTBEAT_S, stale / 4.5))
    if beat >= stale:
        raise StorageError(f"{HEARTBEAT_ENV}={beat:g} must be shorter than {STALE_ENV}={stale:g} (a lock "
                           "would go stale between two heartbeats); unset them for 20 s and 90 s")
    return stale, beat


def _seconds(var: str, default: float) -> float:
    text = os.environ.get(var)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise StorageError(f"{var}={text!r} is not a positive number of seconds; unset it or set e.g. 90")
    return value


def new_holder(owner: dict[str, object] | None = None) -> dict[str, object]:
    """This run's lock record; `owner` adds who it is to the orchestrator (the Prefect flow run id),
    so a run that takes over a dead run's lock can say so there."""
    return {**(owner or {}), "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex, "heartbeat": time.time(),
            "machine": _machine()}


def _machine() -> str | None:
    """This kernel's boot and PID namespace: a PID names the same process only where both match
    (containers share a boot, not a PID namespace, and may share a host name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def gone_from_here(holder: dict[str, object] | None) -> bool:
    """The holder ran on this machine (host name, boot, PID namespace) and its process has exited:
    a run that failed because the store stopped answering could not delete its lock, and its rerun
    here need not wait for the lock to go stale."""
    if not holder:
        return False
    machine, pid = holder.get("machine"), holder.get("pid")
    if holder.get("host") != socket.gethostname() or not machine or machine != _machine():
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


# Called with a dead run's holder record when this run takes its lock over; it must not raise.
TakeoverHook = Callable[[dict[str, object]], None]


def report_takeover(hook: TakeoverHook | None, holder: dict[str, object] | None) -> None:
    if hook is not None and holder:
        try:
            hook(holder)
        except Exception:  # noqa: BLE001 - bookkeeping about the dead run never stops this one
            pass


def holder_of(data: bytes) -> dict[str, object] | None:
    """A lock's holder record, or None where its bytes are not one (damaged, foreign)."""
    try:
        value = json.loads(data[:4096] or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def stale_note(stale_s: float, age_s: float) -> str:
    return f"its lock goes stale after {stale_s:.0f} s without a heartbeat; last heartbeat {age_s:.0f} s ago"

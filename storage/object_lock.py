"""DEST's lock on an object store: a lease held by compare-and-swap (`storage.conditional`).

Object stores have no locks. The lock is an object holding its holder's identity and a heartbeat;
every write to it is conditional, so it has one owner at a time:
- acquire: create it only if absent; take over a stale one only while it is the version judged
  stale (two runs that both judged it stale: one wins, the other is refused);
- heartbeat: rewrite it only while it is the version this run last wrote. A run that was paused
  (SIGSTOP, a suspended VM, a long GC) past the stale limit finds another run's version there,
  marks its lease lost, and every later publish under DEST refuses (`ensure_held`);
- release: delete it only while it is ours.

Stale means: no heartbeat for `stale_s`, or a holder that ran on this machine and has exited
(`lock_common.gone_from_here`: a run the store stopped answering could not delete its lock).
A heartbeat that lies in the past is read against this machine's clock; one in the future, or a
lock that cannot be parsed, cannot be trusted, so its age is measured from when this run first
saw that very version, watching it for up to `stale_s` (if it changes meanwhile, its holder is
alive).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator

from ckptflow.storage import conditional
from ckptflow.storage.lock_common import (LOCK_NAME, DestBusy, LockLost, TakeoverHook, gone_from_here, holder_of,
                                          limits, new_holder, report_takeover, stale_note)
from ckptflow.storage.urls import Location

log = logging.getLogger("ckptflow.lock")
# A heartbeat this far ahead of our clock is still read as "just now" (ordinary clock skew).
_SKEW_S = 5.0


class Lease:
    """This run's hold on one DEST's lock object."""

    def __init__(self, dst: Location, holder: dict[str, object], etag: str, stale_s: float, beat_s: float):
        self.dst, self.holder, self.etag = dst, holder, etag
        self.stale_s, self.beat_s = stale_s, beat_s
        self.confirmed = time.monotonic()  # when the store last accepted our version
        self.lost: str | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and publishing threads renew in turn

    def renew(self) -> bool:
        """Rewrite the lock with a fresh heartbeat if it is still ours; False once it is not.
        Network errors propagate (the lease may still be ours)."""
        with self._mutex:
            if self.lost is not None:
                return False
            body = json.dumps({**self.holder, "heartbeat": time.time()}).encode()
            etag = conditional.replace(self.dst, LOCK_NAME, body, self.etag)
            if etag is None:
                silent = time.monotonic() - self.confirmed
                now = conditional.read(self.dst, LOCK_NAME)
                other = holder_of(now[0]) if now else None
                by = (f"pid {other.get('pid')} on {other.get('host')} holds it now" if other
                      else "it was deleted")
                self.lost = (f"this run lost its lock after {silent:.0f} s without a heartbeat (paused, or cut "
                             f"off from the store?) and {by}")
                return False
            self.etag, self.confirmed = etag, time.monotonic()
            return True

    def ensure(self, what: str) -> None:
        """Raise `LockLost` unless the lock is still ours, checked with the store now: called just
        before `what` is published under DEST, so a run that lost DEST writes nothing more."""
        try:
            ours = self.renew()
        except Exception as exc:  # noqa: BLE001 - the store is unreachable, not necessarily lost
            age = time.monotonic() - self.confirmed
            if age < self.stale_s - self.beat_s:
                return  # nobody may take it over before `stale_s` after our last accepted write
            self.lost = f"this run could not refresh its lock for {age:.0f} s ({exc})"
            ours = False
        if not ours:
            raise LockLost(f"DEST {self.dst.url}: {self.lost}; it stopped before writing {what}. Another "
                           "ckptflow run may be writing DEST: let it finish, or run the same command again "
                           "once no other run is writing DEST")

    def ensure_recent(self, what: str) -> None:
        """`ensure`, asking the store only when the lease is not known fresh: called before a file
        under DEST is started. While the heartbeat keeps it confirmed this costs nothing; a run
        woken from a pause (its last confirmation older than two heartbeats) or one already
        lost refuses now, before computing bytes it could never publish."""
        if self.lost is None and time.monotonic() - self.confirmed <= 2 * self.beat_s:
            return
        self.ensure(what)

    def release(self) -> None:
        with self._mutex:
            if self.lost is None:
                conditional.delete(self.dst, LOCK_NAME, self.etag)
            self.lost = self.lost or "released"


# Leases this process holds, for `ensure_held` (publishes), `ensure_not_lost` (a file's start)
# and `release_held` (Ctrl-C).
_LEASES: dict[int, Lease] = {}


def _leases_over(loc: Location, name: str) -> list[Lease]:
    path = loc.path(name)
    return [lease for lease in list(_LEASES.values())
            if lease.dst.fs.protocol == loc.fs.protocol and path.startswith(lease.dst.root.rstrip("/") + "/")]


def ensure_held(loc: Location, name: str) -> None:
    """Before publishing `name` under `loc`: refuse if `loc` lies under an object-store DEST whose
    lock this process held and has lost. Shard tasks on other processes (Dask workers) hold no
    lease here and are not checked."""
    for lease in _leases_over(loc, name):
        lease.ensure(loc.url_of(name))


def ensure_not_lost(loc: Location, name: str) -> None:
    """Before starting `name` under `loc`: refuse if that DEST's lease is lost, or turns out lost
    when a lease unconfirmed for a while is checked (`Lease.ensure_recent`). Without it, a run
    woken after its lock was taken over read, computed and uploaded each shard still to come
    (importing torch for the first) only for its publish to refuse: seconds of CPU and minutes
    of bandwidth at scale, for bytes it could never publish."""
    for lease in _leases_over(loc, name):
        lease.ensure_recent(loc.url_of(name))


def release_held() -> None:
    """Delete every object-store lock this process holds that is still ours (the CLI's interrupt
    handler, which leaves without unwinding the `dest_lock` blocks)."""
    for lease in list(_LEASES.values()):
        with contextlib.suppress(Exception):
            lease.release()


def acquire(dst: Location, owner: dict[str, object] | None = None, on_takeover: TakeoverHook | None = None) -> Lease:
    """Take DEST's lock, or raise `DestBusy` naming the holder and when its lock goes stale.
    `on_takeover(holder)` hears of a stale lock this run took over (the dead run's record)."""
    stale_s, beat_s = limits()
    me = new_holder(owner)
    body = json.dumps(me).encode()
    first_seen: tuple[str, float] | None = None  # (ETag, monotonic) of an untrusted version watched
    while True:
        etag = conditional.create(dst, LOCK_NAME, body)
        if etag is not None:
            return Lease(dst, me, etag, stale_s, beat_s)
        current = conditional.read(dst, LOCK_NAME)
        if current is None:
            continue  # released between our create and read: create again
        data, seen = current
        holder = holder_of(data)
        beat = holder.get("heartbeat") if holder else None
        age = time.time() - beat if isinstance(beat, (int, float)) and not isinstance(beat, bool) else None
        if age is not None and age >= -_SKEW_S:
            if age < stale_s and not gone_from_here(holder):
                raise DestBusy(dst, holder, stale_note(stale_s, max(age, 0.0)))
        else:  # a heartbeat in the future, or no readable one: trust only what this run watched
            if first_seen is not None and first_seen[0] != seen:
                raise DestBusy(dst, holder, f"its lock changed while this run watched it, so its holder is "
                               f"alive (lock goes stale after {stale_s:.0f} s without a heartbeat)")
            if first_seen is None:
                first_seen = (seen, time.monotonic())
                what = "a heartbeat in the future" if holder and beat is not None else "no readable heartbeat"
                log.warning("DEST %s: its lock has %s; watching it for %.0f s, then taking it over if "
                            "it has not changed", dst.url, what, stale_s)
            left = stale_s - (time.monotonic() - first_seen[1])
            if left > 0:
                time.sleep(min(left, beat_s))
                continue
        taken = conditional.replace(dst, LOCK_NAME, body, seen)
        if taken is not None:
            report_takeover(on_takeover, holder)
            return Lease(dst, me, taken, stale_s, beat_s)
        # Another run changed it first (took it over, or its holder beat): judge the new version.
        first_seen = None


@contextlib.contextmanager
def object_lock(dst: Location, owner: dict[str, object] | None = None,
                on_takeover: TakeoverHook | None = None) -> Iterator[None]:
    """Hold DEST's lock object for the block, refreshing it every `beat_s` in a thread."""
    lease = acquire(dst, owner, on_takeover)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease.beat_s):
            try:
                if not lease.renew():
                    return  # lost: publishes now refuse (`ensure_held`); nothing more to refresh
            except Exception:  # noqa: BLE001 - a missed beat only shortens the lease
                pass

    thread = threading.Thread(target=beat, name="ckptflow-lock-heartbeat", daemon=True)
    thread.start()
    _LEASES[id(lease)] = lease
    try:
        yield
    finally:
        _LEASES.pop(id(lease), None)
        stop.set()
        thread.join(5)
        with contextlib.suppress(Exception):
            lease.release()

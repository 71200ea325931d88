"""One conversion, start to finish, with no orchestrator: lock DEST → prepare it → each planned
pass (journal reuse, shards, finalize, read-back verify) → drop intermediates.

Planning is done before (`ckptflow.flows.preflight`: headers in, passes out); how shard work runs
is the caller's `Submitter` (`ckptflow.tasks.run.submit`: serial, threads, or Prefect tasks). The
Prefect flows are thin wrappers that hand this a Prefect submitter and publish what it returns;
tests, benches and scripts call it directly, with Prefect not even importable.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ContextManager

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.lock import TakeoverHook, dest_lock
from ckptflow.storage.remote import check_writable_dest
from ckptflow.storage.urls import Location, open_location
from ckptflow.tasks.plan.model import PlanError, StagePlan
from ckptflow.tasks.planners.torch_dtype import DtypeReport
from ckptflow.tasks.run.passes import drop_intermediate, finalize, prepare_dest, run_shards, verify_output
from ckptflow.tasks.run.submit import SerialSubmitter, Submitter


@dataclass(frozen=True)
class EnginePass:
    """One pass over the bytes: its plan, whether it writes an intermediate under the work
    location, and how to plan it again on the real intermediate (MP after a dequant pass)."""

    plan: StagePlan
    into_work: bool = False
    replan: Callable[[Checkpoint], StagePlan] | None = None
    # A side pass (--quantize nvfp4's amax pass) writes what the next pass's `side_replan` reads
    # (from its written checkpoint under the work location); the next pass reads the same source.
    side: bool = False
    side_replan: Callable[[Location, Checkpoint], StagePlan] | None = None


@dataclass
class EngineHooks:
    """What a caller hears of a run, and adds to it; every field optional."""

    on_commit: Callable[[dict[str, Any]], None] | None = None      # each shard committed or reused
    on_dtype_report: Callable[[DtypeReport, str], None] | None = None
    lock_owner: dict[str, object] | None = None                   # goes into DEST's lock record
    on_takeover: TakeoverHook | None = None                        # a dead run's lock was taken
    around_pass: Callable[[], ContextManager[Any]] | None = None   # e.g. Prefect tags on shard tasks


@dataclass(frozen=True)
class PassResult:
    plan: StagePlan
    records: list[dict[str, Any]]
    into: str  # "DEST" or "work"


@dataclass(frozen=True)
class EngineResult:
    passes: list[PassResult]
    report: DtypeReport
    notes: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for p in self.passes for r in p.records]


def run_conversion(ckpt: Checkpoint, passes: list[EnginePass], src: Location, dst: Location, work: str,
                   storage_options: dict[str, Any] | None = None, *, submitter: Submitter | None = None,
                   protected: tuple[Location, ...] = (), prune: bool = False, checksum: bool = False,
                   device: str = "cpu", backend: str = "auto", allow_dtypes: tuple[str, ...] = (),
                   keep_intermediates: bool = False, hooks: EngineHooks | None = None) -> EngineResult:
    """Run every planned pass of one conversion of `ckpt` (at `src`) into `dst`.

    The caller has checked that SOURCE, DEST and `work` do not overlap. `protected` locations
    (SOURCE, a fetched copy) are never deleted from, whatever `prune` finds. An intermediate pass
    output under `work` is deleted once DEST is verified, unless `keep_intermediates`. Raises the first
    failing shard's error after the others ended; committed shards stay for a rerun to reuse.
    """
    hooks = hooks or EngineHooks()
    submitter = submitter or SerialSubmitter()
    around = hooks.around_pass or contextlib.nullcontext
    check_writable_dest(dst)  # before the lock's first write: a missing bucket is never created
    results: list[PassResult] = []
    report: DtypeReport | None = None
    with dest_lock(dst, hooks.lock_owner, hooks.on_takeover):
        prepare_dest(dst, {s.file for p in passes if not p.into_work for s in p.plan.shards}, prune,
                     protected=(src, *protected))
        side: tuple[Location, Checkpoint] | None = None
        for p in passes:
            plan = p.replan(ckpt) if p.replan is not None else p.plan
            if p.side_replan is not None:
                if side is None:
                    raise PlanError(f"internal: pass {plan.stage} needs a side pass before it")
                plan = p.side_replan(*side)
            out = _stage_location(work, plan, storage_options) if p.into_work else dst
            with around(), _lock_if(p.into_work, out):
                records = run_shards(plan, ckpt, src, out, work, storage_options, submitter, checksum, device,
                                     backend, on_commit=hooks.on_commit)
                finalize(plan, ckpt, src, out)
                written, report = verify_output(out, plan, allow_dtypes, hooks.on_dtype_report)
            results.append(PassResult(plan, records, "work" if p.into_work else "DEST"))
            if p.side:
                side = (out, written)
            else:
                src, ckpt = out, written
    if report is None:
        raise PlanError("nothing to run: no pass was planned")
    notes = [drop_intermediate(_stage_location(work, r.plan, storage_options)) for r in results
             if r.into == "work" and not keep_intermediates]
    return EngineResult(results, report, notes)


def _stage_location(work: str, plan: StagePlan, storage_options: dict[str, Any] | None) -> Location:
    return open_location(f"{work.rstrip('/')}/stages/{plan.stage}", storage_options)


@contextlib.contextmanager
def _lock_if(locked: bool, loc: Location) -> Iterator[None]:
    with (dest_lock(loc) if locked else contextlib.nullcontext()):
        yield

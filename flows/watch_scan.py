"""What a watch run would convert, and why: listings, markers and the plan, with no Prefect.

The watch flow (flows/watch.py) runs this inside its flow run; `ckptflow watch --dry-run` runs it
in the CLI process alone, so a dry run answers in about a second and starts no server."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptflow.storage.files import read_json
from ckptflow.storage.listing import list_tree
from ckptflow.storage.urls import Location, StorageError
from ckptflow.tasks.planners.watch import MARKER_NAME, FoundCheckpoint, WatchPlan, find_checkpoints, plan_watch

Warn = Callable[[str], None]


@dataclass(frozen=True)
class WatchScan:
    found: dict[str, FoundCheckpoint]
    plan: WatchPlan


def scan_watch(src: Location, dst: Location, work: Location, recipe: dict[str, Any], settle_seconds: float,
               warn: Warn) -> WatchScan:
    """One listing of each prefix, the markers of finished conversions, and the decisions."""
    found = find_checkpoints(list_tree(src))
    outputs = list_tree(dst) if dst.fs.exists(dst.root) else {}
    markers = read_watch_markers(work, list(found), warn)
    return WatchScan(found, plan_watch(found, markers, outputs, recipe, time.time(), settle_seconds))


def read_watch_markers(work: Location, names: list[str], warn: Warn) -> dict[str, Any]:
    """The marker of each checkpoint's last finished conversion; an unreadable one counts as none
    (that checkpoint is converted again, mostly from cached shards)."""
    if not work.fs.exists(work.root):
        return {}
    present = set(list_tree(work))
    markers = {}
    for n in names:
        if f"{n}/{MARKER_NAME}" in present:
            try:
                markers[n] = read_json(work, f"{n}/{MARKER_NAME}")
            except StorageError as exc:
                warn(f"{exc}; converting {n} again")
    return markers


def watch_summary(source_prefix: str, dest_prefix: str, plan: WatchPlan, dry_run: bool,
                  results: dict[str, Any]) -> dict[str, Any]:
    """The report of a watch run: each checkpoint's decision, and its conversion's result if it ran."""
    return {"source_prefix": source_prefix, "dest_prefix": dest_prefix, "dry_run": dry_run,
            "checkpoints": [{"name": d.name, "action": d.action, "reason": d.reason,
                             **({"result": results[d.name]} if d.name in results else {})}
                            for d in plan.decisions]}

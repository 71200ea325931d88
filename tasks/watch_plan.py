"""Which checkpoints under a prefix need converting: a pure planner for the watch flow.

Input is one listing of the source prefix, one of the destination prefix, and the markers the
watch flow wrote after each conversion it finished. A checkpoint is a top-level folder of the
prefix with a `*.safetensors` file or an index at its top. It is converted when:

- new: no marker (never converted, or a conversion that did not finish);
- source changed: the fingerprint of its files (names, sizes, etags / mtimes) differs;
- options changed: the recipe that made the output differs from today's;
- output missing or changed: a file the conversion wrote is gone or has another size;

and skipped while settling: a file changed less than `settle_seconds` ago, as while an upload
is still going on (a half-uploaded checkpoint would fail validation, or be converted twice).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from storage.files import INDEX_NAME
from storage.listing import FileStat

MARKER_NAME = "watch.json"


@dataclass(frozen=True)
class FoundCheckpoint:
    name: str                      # folder under the prefix
    files: dict[str, FileStat]     # relative to that folder
    fingerprint: str               # sha256 over (name, size, version) of every file
    newest: float | None           # latest modification time of any file


@dataclass(frozen=True)
class WatchDecision:
    name: str
    action: str  # "convert" | "up to date" | "settling"
    reason: str


@dataclass
class WatchPlan:
    decisions: list[WatchDecision] = field(default_factory=list)

    def to_convert(self) -> list[WatchDecision]:
        return [d for d in self.decisions if d.action == "convert"]


def source_fingerprint(files: dict[str, FileStat]) -> str:
    """Changes when any file is added, removed, resized or rewritten (new etag / mtime)."""
    rows = [[name, stat.size, stat.version] for name, stat in sorted(files.items())]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def group_by_folder(listing: dict[str, FileStat]) -> dict[str, dict[str, FileStat]]:
    """`a/x.safetensors`, `a/config.json`, `b/…` → {"a": {"x.safetensors": …, …}, "b": …}.
    Files directly under the prefix belong to no checkpoint and are left out."""
    out: dict[str, dict[str, FileStat]] = {}
    for path, stat in listing.items():
        if "/" in path:
            top, rest = path.split("/", 1)
            out.setdefault(top, {})[rest] = stat
    return out


def find_checkpoints(listing: dict[str, FileStat]) -> dict[str, FoundCheckpoint]:
    found = {}
    for name, files in group_by_folder(listing).items():
        top = [f for f in files if "/" not in f]
        if not any(f.endswith(".safetensors") or f == INDEX_NAME for f in top):
            continue
        times = [s.modified for s in files.values() if s.modified is not None]
        found[name] = FoundCheckpoint(name, files, source_fingerprint(files), max(times) if times else None)
    return dict(sorted(found.items()))


def marker(fingerprint: str, recipe: dict[str, Any], dest: str, output: dict[str, FileStat]) -> dict[str, Any]:
    """What the watch flow records once a checkpoint (as it was at `fingerprint`) has been
    converted into `dest`, which now holds `output`."""
    return {"source_fingerprint": fingerprint, "recipe": recipe_fingerprint(recipe), "dest": dest,
            "output": {name: stat.size for name, stat in output.items()}}


def plan_watch(found: dict[str, FoundCheckpoint], markers: dict[str, dict[str, Any]],
               outputs: dict[str, dict[str, FileStat]], recipe: dict[str, Any], now: float,
               settle_seconds: float) -> WatchPlan:
    plan = WatchPlan()
    key = recipe_fingerprint(recipe)
    for name, ckpt in found.items():
        if ckpt.newest is not None and now - ckpt.newest < settle_seconds:
            age = max(0.0, now - ckpt.newest)
            plan.decisions.append(WatchDecision(name, "settling", f"a file changed {age:.0f}s ago "
                                                f"(< settle_seconds={settle_seconds:g}); next run"))
            continue
        reason = _stale_reason(ckpt, markers.get(name), outputs.get(name, {}), key)
        plan.decisions.append(WatchDecision(name, "convert" if reason else "up to date", reason or "output matches"))
    return plan


def _stale_reason(ckpt: FoundCheckpoint, mark: dict[str, Any] | None, output: dict[str, FileStat],
                  key: str) -> str | None:
    if not mark:
        return "new"
    if mark.get("source_fingerprint") != ckpt.fingerprint:
        return "source changed"
    if mark.get("recipe") != key:
        return "options changed"
    written = mark.get("output") or {}
    missing = sorted(n for n in written if n not in output)
    if missing:
        return f"output missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    resized = sorted(n for n, size in written.items() if output[n].size != size)
    if resized:
        return f"output changed: {resized[0]}"
    return None

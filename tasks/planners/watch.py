"""Which checkpoints under a prefix need converting: a pure planner for the watch flow.

Input is one listing of the source prefix, one of the destination prefix, and the markers the
watch flow wrote after each conversion it finished. A checkpoint is a folder under the prefix,
at any depth, with a `*.safetensors` file or an index directly in it (`org/model`); folders
below a checkpoint belong to it. It is converted when:

- new: no marker (never converted, or a conversion that did not finish);
- source changed: the fingerprint of its files (names, sizes, etags / mtimes) differs;
- options changed: the recipe that made the output differs from today's;
- output missing or changed: a file the conversion wrote is gone or has another size;

and skipped while settling: a file changed less than `settle_seconds` ago, as while an upload
is still going on (a half-uploaded checkpoint would fail validation, or be converted twice).
Stores that give no modification times cannot settle; the decision says so.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ckptflow.storage.files import INDEX_NAME
from ckptflow.storage.listing import FileStat

MARKER_NAME = "watch.json"


@dataclass(frozen=True)
class FoundCheckpoint:
    name: str                      # folder under the prefix: "model" or "org/model"
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


def checkpoint_folders(listing: dict[str, FileStat]) -> list[str]:
    """The shallowest folders with weights or an index directly in them, in sorted order.
    Files directly under the prefix belong to no checkpoint (the prefix is not one)."""
    holders = {path.rsplit("/", 1)[0] for path in listing
               if "/" in path and (path.endswith(".safetensors") or path.rsplit("/", 1)[1] == INDEX_NAME)}
    return sorted(h for h in holders if not any(h.startswith(other + "/") for other in holders))


def files_under(listing: dict[str, FileStat], folder: str) -> dict[str, FileStat]:
    prefix = folder + "/"
    return {path[len(prefix):]: stat for path, stat in listing.items() if path.startswith(prefix)}


def find_checkpoints(listing: dict[str, FileStat]) -> dict[str, FoundCheckpoint]:
    found = {}
    for name in checkpoint_folders(listing):
        files = files_under(listing, name)
        times = [s.modified for s in files.values() if s.modified is not None]
        found[name] = FoundCheckpoint(name, files, source_fingerprint(files), max(times) if times else None)
    return found


def marker(fingerprint: str, recipe: dict[str, Any], dest: str, output: dict[str, FileStat]) -> dict[str, Any]:
    """What the watch flow records once a checkpoint (as it was at `fingerprint`) has been
    converted into `dest`, which now holds `output`."""
    return {"source_fingerprint": fingerprint, "recipe": recipe_fingerprint(recipe), "dest": dest,
            "output": {name: stat.size for name, stat in output.items()}}


def plan_watch(found: dict[str, FoundCheckpoint], markers: dict[str, dict[str, Any]],
               outputs: dict[str, FileStat], recipe: dict[str, Any], now: float,
               settle_seconds: float) -> WatchPlan:
    """`outputs` is the listing of the destination prefix; `markers` by checkpoint name."""
    plan = WatchPlan()
    key = recipe_fingerprint(recipe)
    for name, ckpt in found.items():
        if ckpt.newest is not None and now - ckpt.newest < settle_seconds:
            age = max(0.0, now - ckpt.newest)
            plan.decisions.append(WatchDecision(name, "settling", f"a file changed {age:.0f}s ago "
                                                f"(< settle_seconds={settle_seconds:g}); next run"))
            continue
        reason = _stale_reason(ckpt, markers.get(name), files_under(outputs, name), key)
        if reason and ckpt.newest is None and settle_seconds > 0:
            reason += " (the store gives no modification times: not checked for a finished upload)"
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

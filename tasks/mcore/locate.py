"""Which folder holds the checkpoint, and in which format: from the layout, never from guesses.

A Megatron save root has `latest_checkpointed_iteration.txt` naming "release" or an iteration,
whose folder (`release/`, `iter_0000100/`) holds either a torch_dist checkpoint (`.metadata`,
`*.distcp`, `metadata.json`, `common.pt`) or legacy rank folders (`mp_rank_TT[_PPP][_EEE]/
model_optim_rng.pt`). The URL may also name that iteration folder itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ckptflow.storage.files import list_files
from ckptflow.storage.urls import Location, StorageError
from ckptflow.tasks.megatron.tracker import MAX_ITERATION, TRACKER, TRACKER_CAP
from ckptflow.tasks.megatron.safe import MegatronLoadError

RANK_FILE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?/model_optim_rng\.pt")
_ITER = re.compile(r"iter_(\d{1,13})")


@dataclass(frozen=True)
class Found:
    loc: Location                     # the iteration folder
    format: Literal["torch_dist", "legacy"]
    iteration: int | None             # None for `release` (or a folder named otherwise)
    files: dict[str, int]             # relative name → size (hidden names such as .metadata left out)


def _tracker(loc: Location) -> str | None:
    try:
        raw = loc.fs.cat_file(loc.path(TRACKER), start=0, end=TRACKER_CAP + 1).decode(errors="replace")
    except FileNotFoundError:
        return None
    text = raw.strip()
    if len(raw) > TRACKER_CAP or not (text == "release" or re.fullmatch(r"[0-9]{1,13}", text)
                                      and int(text) <= MAX_ITERATION):
        held = f"more than {TRACKER_CAP} bytes" if len(raw) > TRACKER_CAP else repr(text[:40])
        raise MegatronLoadError(f"{loc.url_of(TRACKER)}: holds {held}; expected 'release' or an iteration number")
    return "release" if text == "release" else f"iter_{int(text):07d}"


def find_checkpoint(loc: Location) -> Found:
    """The iteration folder under (or at) `loc` and its format; one error naming the URL otherwise."""
    sub = _tracker(loc)
    if sub is not None:
        folder = loc.child(sub)
        files = _listing(folder)
        if not files:
            raise MegatronLoadError(f"{loc.url_of(TRACKER)} names {sub!r} but {folder.url} holds no files; "
                                    "the save is incomplete or was moved: pass the iteration folder itself")
    else:
        folder, files = loc, _listing(loc)
        iters = sorted({n.split("/", 1)[0] for n in files if "/" in n and _ITER.fullmatch(n.split("/", 1)[0])})
        if not _format(files) and iters:
            raise MegatronLoadError(f"{loc.url}: holds {len(iters)} iteration folders ({', '.join(iters[:4])}"
                                    f"{', ...' if len(iters) > 4 else ''}) and no {TRACKER}; pass one of them")
    fmt = _format(files)
    if fmt is None:
        shown = ", ".join(sorted(files)[:6]) or "nothing"
        raise MegatronLoadError(f"{folder.url}: not a Megatron-Core checkpoint: no .distcp files with "
                                f"metadata.json, no mp_rank_*/model_optim_rng.pt (found: {shown}); pass the "
                                "save root (with latest_checkpointed_iteration.txt) or an iter_N / release folder")
    name = folder.root.rstrip("/").rsplit("/", 1)[-1]
    m = _ITER.fullmatch(name)
    return Found(folder, fmt, int(m.group(1)) if m else None, files)


def _listing(loc: Location) -> dict[str, int]:
    try:
        return list_files(loc)
    except StorageError:
        return {}


def _format(files: dict[str, int]) -> Literal["torch_dist", "legacy"] | None:
    dist = any(n.endswith(".distcp") and "/" not in n for n in files)
    legacy = any(RANK_FILE.fullmatch(n) for n in files)
    if dist and legacy:
        return "torch_dist"  # Megatron writes one or the other; a mixed folder is read as what .metadata says
    return "torch_dist" if dist else "legacy" if legacy else None

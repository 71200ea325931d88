"""Validate a checkpoint: the index against every shard header, and each header on its own.

`find_problems` is pure (a `Checkpoint` in, a list of `Problem`s out) and reports every problem
at once; `raise_on_errors` is what a conversion calls before planning.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ckptflow.storage.errors import problem_list
from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.errors import UserError
from ckptflow.storage.files import INDEX_NAME
from ckptflow.storage.safetensors_format import DTYPE_SIZES, Header
from ckptflow.storage.strict_json import short

# A hostile header can make every one of 200k tensors wrong: list this many per file (and per
# index), then count the rest, so memory and output stay bounded and the first ones still show.
MAX_PROBLEMS_PER_FILE = 100
MAX_INDEX_PROBLEMS = 1000
MAX_LINE = 380  # a problem prints as one line of at most this many characters


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    tensor: str | None = None
    severity: str = "error"   # "error" stops a conversion; "warning" is reported only

    def __str__(self) -> str:
        file = self.file if len(self.file) <= 160 else self.file[:159] + "…"
        where = f"{file}: tensor {short(self.tensor, 160)}: " if self.tensor else f"{file}: "
        text = where + self.message
        return text if len(text) <= MAX_LINE else text[:MAX_LINE - 1] + "…"


class ValidationFailed(UserError):
    """Raised with every error found; its message lists them one per line."""

    def __init__(self, url: str, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(f"{url}: {len(errors)} problem(s) found; nothing was converted\n{problem_list(errors)}")


def _capped(problems: Iterable[Problem], file: str, limit: int) -> list[Problem]:
    """The first `limit` problems, then one that counts the rest."""
    out: list[Problem] = []
    more = more_errors = 0
    for p in problems:
        if len(out) < limit:
            out.append(p)
        else:
            more += 1
            more_errors += p.severity == "error"
    if more:
        out.append(Problem(file, f"… and {more} more problem(s) not listed",
                           severity="error" if more_errors else "warning"))
    return out


def header_problems(h: Header, limit: int = MAX_PROBLEMS_PER_FILE) -> list[Problem]:
    """Offsets in bounds, matching dtype × shape, non-overlapping, covering the data exactly."""
    return _capped(_header_problems(h), h.file, limit)


def _header_problems(h: Header) -> Iterator[Problem]:
    cursor = h.data_start
    cut: list[str] = []  # tensors whose data runs past the end: one problem for the file, with the count
    for info in h.tensors.values():  # ordered by start offset
        size = DTYPE_SIZES.get(info.dtype)
        if size is None:
            yield Problem(h.file, f"unknown dtype {short(info.dtype, 40)} (known: "
                                  f"{', '.join(sorted(DTYPE_SIZES))})", info.name)
        if info.end < info.start:
            yield Problem(h.file, f"data_offsets end before they start "
                                  f"[{info.start - h.data_start}, {info.end - h.data_start}]", info.name)
            continue
        if info.end > h.file_size:
            cut.append(info.name)
        expected = info.expected_nbytes()
        if expected is not None and expected != info.nbytes:
            yield Problem(h.file, f"holds {info.nbytes} bytes but {info.dtype} × "
                                  f"{short(list(info.shape), 80)} needs {expected}", info.name)
        if info.start < cursor:
            yield Problem(h.file, "data overlaps the previous tensor's bytes", info.name)
        elif info.start > cursor:
            yield Problem(h.file, f"{info.start - cursor} unused bytes before this tensor "
                                  "(safetensors requires contiguous data)", info.name)
        cursor = max(cursor, info.end)
    if cut:
        yield Problem(h.file, f"truncated: the header's data runs to byte {cursor} but the file has "
                              f"{h.file_size} bytes; {len(cut)} of {len(h.tensors)} tensor(s) cut "
                              f"(first: {short(cut[0], 120)}) — fetch it again")
    elif cursor < h.file_size:
        yield Problem(h.file, f"{h.file_size - cursor} trailing bytes after the last tensor")


def index_problems(ckpt: Checkpoint, require_index: bool = True) -> list[Problem]:
    return _capped(_index_problems(ckpt, require_index), INDEX_NAME, MAX_INDEX_PROBLEMS)


def _index_problems(ckpt: Checkpoint, require_index: bool) -> Iterator[Problem]:
    index = ckpt.index
    if index is None:
        if len(ckpt.weight_files) > 1 and require_index:
            yield Problem(INDEX_NAME, f"missing: the checkpoint has {len(ckpt.weight_files)} "
                                      ".safetensors files but no index to say which tensor is where")
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        yield Problem(INDEX_NAME, "has no 'weight_map' object")
        return
    per_file = Counter(weight_map.values())  # one pass: a hostile index may name 500k files
    for f in sorted(set(per_file) - set(ckpt.files)):
        yield Problem(f, f"listed in {INDEX_NAME} for {per_file[f]} tensor(s) but the file is missing")
    first: dict[str, str] = {}           # tensor → the first file holding it
    more: dict[str, list[str]] = {}      # tensor → every file, for tensors in several only
    for f, h in sorted(ckpt.headers.items()):
        for t in h.tensors:
            if first.setdefault(t, f) != f:
                more.setdefault(t, [first[t]]).append(f)
    for t, f in sorted(weight_map.items()):
        h = ckpt.headers.get(f)
        if h is not None and t not in h.tensors:
            found = more.get(t) or ([first[t]] if t in first else [])
            hint = f" (it is in {short(', '.join(found[:5]), 160)})" if found else ""
            yield Problem(f, f"listed in {INDEX_NAME} but not in this file{hint}", t)
    for t, f0 in sorted(first.items()):
        files = more.get(t, [f0])
        if len(files) > 1:
            yield Problem(files[0], f"appears in {len(files)} files: {', '.join(files)}", t)
        for f in files:
            if t not in weight_map:
                yield Problem(f, f"in this file but not in {INDEX_NAME}", t)
    for f in sorted(set(ckpt.headers) - set(per_file)):
        if ckpt.headers[f].tensors:
            continue  # its tensors were each reported as missing from the index
        yield Problem(f, f"not referenced by {INDEX_NAME}", severity="warning")
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    actual = sum(i.nbytes for h in ckpt.headers.values() for i in h.tensors.values())
    if total is None:
        yield Problem(INDEX_NAME, "has no metadata.total_size", severity="warning")
    elif not ckpt.header_errors and int(total) != actual:
        yield Problem(INDEX_NAME, f"metadata.total_size is {total} but the tensors hold {actual} bytes")


# The model-parallel layout ckptflow (and DeepSeek-V3's inference/convert.py) writes: one
# `model{rank}-mp{world}.safetensors` per rank, no index (every rank holds its part of the same names).
MP_FILE = re.compile(r"^model(0|[1-9][0-9]{0,5})-mp([1-9][0-9]{0,5})\.safetensors$")


def mp_world(ckpt: Checkpoint) -> int | None:
    """The world size when every weight file is named as an MP rank file and there is no index,
    else None. Whether the ranks are complete is `mp_problems`' business."""
    if ckpt.index is not None or not ckpt.weight_files:
        return None
    found = [MP_FILE.match(f.rsplit("/", 1)[-1]) for f in ckpt.weight_files]
    if not all(found):
        return None
    worlds = {int(m.group(2)) for m in found if m}
    return worlds.pop() if len(worlds) == 1 else -1


def mp_problems(ckpt: Checkpoint) -> Iterator[Problem]:
    """Rank files of one world size, each rank exactly once."""
    found = [m for m in (MP_FILE.match(f.rsplit("/", 1)[-1]) for f in ckpt.weight_files) if m]
    worlds = sorted({int(m.group(2)) for m in found})
    if len(worlds) > 1:
        yield Problem(ckpt.url, f"rank files of several world sizes ({', '.join(f'mp{w}' for w in worlds)}); "
                                "keep the files of one conversion")
        return
    world = worlds[0]
    ranks = {int(m.group(1)) for m in found}
    missing = sorted(set(range(world)) - ranks)
    extra = sorted(r for r in ranks if r >= world)
    if missing:
        shown = ", ".join(f"model{r}-mp{world}.safetensors" for r in missing[:5])
        yield Problem(ckpt.url, f"{len(missing)} of {world} rank file(s) missing: {shown}"
                                + (", …" if len(missing) > 5 else ""))
    if extra:
        yield Problem(ckpt.url, f"rank file(s) beyond world size {world}: "
                                + ", ".join(f"model{r}-mp{world}.safetensors" for r in extra[:5]))


def find_problems(ckpt: Checkpoint, require_index: bool | None = True) -> list[Problem]:
    """Every problem of the checkpoint, errors and warnings, in a stable order.

    `require_index=False` accepts several files without an index: model-parallel layouts,
    where every rank file holds its own part of the same names. `None` (validate, verify)
    accepts them only in the layout ckptflow writes (`mp_world`), and checks its ranks.
    A conversion's SOURCE keeps `True`: the planners read one name → one tensor.
    """
    out: list[Problem] = []
    if require_index is None:
        world = mp_world(ckpt)
        require_index = world is None
        if world is not None:
            out.extend(mp_problems(ckpt))
    if not ckpt.weight_files:
        out.append(Problem(ckpt.url, "no .safetensors files found"))
    for f, reason in sorted(ckpt.header_errors.items()):
        out.append(Problem(f, reason))
    for f, h in sorted(ckpt.headers.items()):
        out.extend(header_problems(h))
    out.extend(index_problems(ckpt, require_index))
    return out


def raise_on_errors(ckpt: Checkpoint) -> list[Problem]:
    """Raise `ValidationFailed` if there is any error; return the warnings otherwise."""
    problems = find_problems(ckpt)
    if any(p.severity == "error" for p in problems):
        raise ValidationFailed(ckpt.url, problems)
    return problems

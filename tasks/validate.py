"""Validate a checkpoint: the index against every shard header, and each header on its own.

`find_problems` is pure (a `Checkpoint` in, a list of `Problem`s out) and reports every problem
at once; `validate_task` is the Prefect task around scanning + checking.
"""
from __future__ import annotations

from dataclasses import dataclass

from storage.checkpoint import Checkpoint
from storage.errors import UserError
from storage.files import INDEX_NAME
from storage.safetensors_format import DTYPE_SIZES, Header


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    tensor: str | None = None
    severity: str = "error"   # "error" stops a conversion; "warning" is reported only

    def __str__(self) -> str:
        where = f"{self.file}: tensor {self.tensor!r}: " if self.tensor else f"{self.file}: "
        return where + self.message


class ValidationFailed(UserError):
    """Raised with every error found; its message lists them one per line."""

    def __init__(self, url: str, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        lines = "\n".join(f"  - {p}" for p in errors[:50])
        more = f"\n  … and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{url}: {len(errors)} problem(s) found; nothing was converted\n{lines}{more}")


def header_problems(h: Header) -> list[Problem]:
    """Offsets in bounds, matching dtype × shape, non-overlapping, covering the data exactly."""
    out: list[Problem] = []
    cursor = h.data_start
    for info in h.tensors.values():  # ordered by start offset
        size = DTYPE_SIZES.get(info.dtype)
        if size is None:
            out.append(Problem(h.file, f"unknown dtype {info.dtype!r} (known: "
                                       f"{', '.join(sorted(DTYPE_SIZES))})", info.name))
        if info.end < info.start:
            out.append(Problem(h.file, f"data_offsets end before they start "
                                       f"[{info.start - h.data_start}, {info.end - h.data_start}]", info.name))
            continue
        if info.end > h.file_size:
            out.append(Problem(h.file, f"data runs to byte {info.end} but the file has {h.file_size} "
                                       "bytes; the file is truncated — fetch it again", info.name))
        expected = info.expected_nbytes()
        if expected is not None and expected != info.nbytes:
            out.append(Problem(h.file, f"holds {info.nbytes} bytes but {info.dtype} × "
                                       f"{list(info.shape)} needs {expected}", info.name))
        if info.start < cursor:
            out.append(Problem(h.file, "data overlaps the previous tensor's bytes", info.name))
        elif info.start > cursor:
            out.append(Problem(h.file, f"{info.start - cursor} unused bytes before this tensor "
                                       "(safetensors requires contiguous data)", info.name))
        cursor = max(cursor, info.end)
    if cursor < h.file_size and not any(p.message.startswith("data runs") for p in out):
        out.append(Problem(h.file, f"{h.file_size - cursor} trailing bytes after the last tensor"))
    return out


def index_problems(ckpt: Checkpoint, require_index: bool = True) -> list[Problem]:
    index = ckpt.index
    if index is None:
        if len(ckpt.weight_files) > 1 and require_index:
            return [Problem(INDEX_NAME, f"missing: the checkpoint has {len(ckpt.weight_files)} "
                                        ".safetensors files but no index to say which tensor is where")]
        return []
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return [Problem(INDEX_NAME, "has no 'weight_map' object")]
    out: list[Problem] = []
    for f in sorted(set(weight_map.values()) - set(ckpt.files)):
        n = sum(1 for v in weight_map.values() if v == f)
        out.append(Problem(f, f"listed in {INDEX_NAME} for {n} tensor(s) but the file is missing"))
    present: dict[str, list[str]] = {}
    for f, h in sorted(ckpt.headers.items()):
        for t in h.tensors:
            present.setdefault(t, []).append(f)
    for t, f in sorted(weight_map.items()):
        h = ckpt.headers.get(f)
        if h is not None and t not in h.tensors:
            found = present.get(t)
            hint = f" (it is in {', '.join(found)})" if found else ""
            out.append(Problem(f, f"listed in {INDEX_NAME} but not in this file{hint}", t))
    for t, files in sorted(present.items()):
        if len(files) > 1:
            out.append(Problem(files[0], f"appears in {len(files)} files: {', '.join(files)}", t))
        for f in files:
            if t not in weight_map:
                out.append(Problem(f, f"in this file but not in {INDEX_NAME}", t))
    for f in sorted(set(ckpt.headers) - set(weight_map.values())):
        if ckpt.headers[f].tensors:
            continue  # its tensors were each reported as missing from the index
        out.append(Problem(f, f"not referenced by {INDEX_NAME}", severity="warning"))
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    actual = sum(i.nbytes for h in ckpt.headers.values() for i in h.tensors.values())
    if total is None:
        out.append(Problem(INDEX_NAME, "has no metadata.total_size", severity="warning"))
    elif not ckpt.header_errors and int(total) != actual:
        out.append(Problem(INDEX_NAME, f"metadata.total_size is {total} but the tensors hold {actual} bytes"))
    return out


def find_problems(ckpt: Checkpoint, require_index: bool = True) -> list[Problem]:
    """Every problem of the checkpoint, errors and warnings, in a stable order.

    `require_index=False` accepts several files without an index: model-parallel layouts,
    where every rank file holds its own part of the same names.
    """
    out: list[Problem] = []
    if not ckpt.weight_files:
        out.append(Problem(ckpt.url, "no .safetensors files found"))
    for f, reason in sorted(ckpt.header_errors.items()):
        out.append(Problem(f, reason))
    for f, h in sorted(ckpt.headers.items()):
        out.extend(header_problems(h))
    out.extend(index_problems(ckpt, require_index))
    return out


def check(ckpt: Checkpoint) -> list[Problem]:
    """Raise `ValidationFailed` if there is any error; return the warnings otherwise."""
    problems = find_problems(ckpt)
    if any(p.severity == "error" for p in problems):
        raise ValidationFailed(ckpt.url, problems)
    return problems

"""Check the small scales of a dequant plan before anything is written: a few bytes each.

Global scales (NVFP4 `weight_global_scale`, ModelOpt `weight_scale_2`) and per-tensor FP8 scales
are one value per weight; a zero, negative or NaN/inf one spoils the whole weight. Reading them
costs a range read per run of neighbouring scales (they sit together in real checkpoints), so
they are checked at planning and refused with one error before a byte is written. Block and
channel scales are as large as a part of the codes: those are checked as a shard reads them
(`finite_guard`). No torch: this runs before the CLI imports it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable

from ckptflow.storage.errors import problem_list
from ckptflow.storage.reader import RangeReader
from ckptflow.storage.read_runs import join_ranges
from ckptflow.storage.transient import with_transient_retries
from ckptflow.storage.urls import Location
from ckptflow.tasks.kernels.finite import bad_scales
from ckptflow.tasks.plan.model import SourceRef, StagePlan
from ckptflow.tasks.plan.transforms import transform_of
from ckptflow.tasks.run.finite_guard import FIX, NonFiniteError, allowed, scale_message

SMALL_BYTES = 64          # a scale up to this size is one "known at planning" (real ones: 4 bytes)
MERGE_GAP = 64 << 10      # neighbouring scales closer than this are read in one range
MAX_SPAN = 4 << 20        # … as long as that range stays small


def small_scales(plans: Iterable[StagePlan]) -> dict[tuple[str, str], tuple[SourceRef, SourceRef]]:
    """(file, name) → (scale, its weight) for every small scale a dequantized tensor reads, unless
    the plan allows non-finite output."""
    out: dict[tuple[str, str], tuple[SourceRef, SourceRef]] = {}
    for plan in plans:
        for shard in plan.shards:
            for t in shard.tensors:
                if not transform_of(t).dequantizes or allowed(t):
                    continue
                for ref in t.sources[1:]:
                    if ref.end - ref.start <= SMALL_BYTES:
                        out.setdefault((ref.file, ref.name), (ref, t.sources[0]))
    return out


def _spans(refs: list[SourceRef]) -> list[tuple[int, int, list[SourceRef]]]:
    """Refs of one file, sorted, grouped into ranges to read at once."""
    return join_ranges(refs, lambda r: (r.start, r.end), MERGE_GAP, MAX_SPAN)


def check_small_scales(src: Location, plans: Iterable[StagePlan]) -> None:
    """Raise `NonFiniteError` naming every small scale that is zero, negative or NaN/inf."""
    found = small_scales(plans)
    if not found:
        return
    by_file: dict[str, list[SourceRef]] = {}
    for ref, _ in found.values():
        by_file.setdefault(ref.file, []).append(ref)
    jobs = [(file, span) for file, refs in sorted(by_file.items()) for span in _spans(refs)]
    problems: list[str] = []
    with RangeReader(src) as reader, ThreadPoolExecutor(min(8, len(jobs))) as pool:
        # Outside any task, so no Prefect retry: a dropped connection is retried here as a shard's would be.
        reads = pool.map(lambda job: with_transient_retries(lambda: bytes(reader.read(job[0], job[1][0], job[1][1]))),
                         jobs)
        for (file, (a, _, group)), raw in zip(jobs, reads):
            for ref in group:
                what = bad_scales(ref.dtype, raw[ref.start - a: ref.end - a])
                if what is not None:
                    problems.append(scale_message(ref, found[(ref.file, ref.name)][1], what))
    if len(problems) == 1:
        raise NonFiniteError(f"{problems[0]}; nothing was written. {FIX}")
    if problems:
        raise NonFiniteError(f"{len(problems)} scale tensors are zero, negative or NaN/inf; nothing was written. "
                             f"{FIX}:\n" + problem_list(problems))

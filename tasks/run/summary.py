"""The summary of one conversion: the dict `ckptflow convert --json` prints, the flow returns and
publishes, and the engine entry (`ckptflow.flows.conversion`) returns. Pure over the records
and plans the engine gave back, plus this process's peak memory; no Prefect.
"""
from __future__ import annotations

from typing import Any, Callable

from ckptflow.tasks.plan.model import StagePlan
from ckptflow.tasks.planners.torch_dtype import DtypeReport

from ckptflow.flows.dry_run import tensor_actions
from ckptflow.flows.params import Recipe


def pass_summary(plan: StagePlan, records: list[dict[str, Any]], into: str) -> dict[str, Any]:
    """What one pass did in this run: written now and reused (an earlier run's) counted apart."""
    fresh = [r for r in records if not r["cached"]]
    reused = [r for r in records if r["cached"]]
    nbytes = tensor_bytes([plan])
    return {"stage": plan.stage, "into": into, "shards": len(records), "cached_shards": len(reused),
            "tensors": sum(r["tensors"] for r in fresh), "reused_tensors": sum(r["tensors"] for r in reused),
            "source_bytes": sum(r.get("source_bytes", 0) for r in fresh),
            "bytes_written": sum(nbytes(r) for r in fresh), "reused_bytes": sum(nbytes(r) for r in reused),
            "dropped_tensors": len(plan.dropped), "actions": tensor_actions(plan)}


def tensor_bytes(plans: list[StagePlan]) -> Callable[[dict[str, Any]], int]:
    """record → the tensor bytes of its shard (as the index's total_size counts them, headers
    not included), looked up by (stage, file) in the plans."""
    sizes = {(p.stage, s.file): s.nbytes for p in plans for s in p.shards}
    return lambda r: sizes.get((r.get("stage"), r.get("name")), int(r.get("size", 0)))


def summarize(recipe: Recipe, plans: list[StagePlan], records: list[dict[str, Any]], report: DtypeReport,
              seconds: float) -> dict[str, Any]:
    """The run's numbers, every pass together: `tensors`, `source_bytes` and `bytes_written` count
    what this run read and wrote (a cached rerun reads and writes nothing); what reused shards hold
    is counted apart (`reused_*`); `output_*` describe the finished DEST."""
    computed = [r for r in records if not r["cached"]]
    reused = [r for r in records if r["cached"]]
    nbytes = tensor_bytes(plans)
    compute_s = sum(r.get("seconds", 0.0) for r in computed)
    in_bytes = sum(r.get("source_bytes", 0) for r in computed)
    return {
        "stage": "+".join(recipe.stages()), "shards": len(records), "cached_shards": len(reused),
        "tensors": sum(r["tensors"] for r in computed), "reused_tensors": sum(r["tensors"] for r in reused),
        "source_bytes": in_bytes, "bytes_written": sum(nbytes(r) for r in computed),
        "reused_bytes": sum(nbytes(r) for r in reused),
        "output_bytes": plans[-1].total_size, "output_tensors": sum(len(s.tensors) for s in plans[-1].shards),
        "dropped_tensors": sum(len(p.dropped) for p in plans),
        "dropped_unmatched": [n for p in plans for n in p.dropped_unmatched],
        "seconds": round(seconds, 3), "shard_seconds": round(compute_s, 3),
        "gb_per_s_in": round(in_bytes / compute_s / 1e9, 3) if compute_s else None,
        "dtypes": {r["dtype"]: r["tensors"] for r in report.rows()}, "records": records,
        "nonfinite": nonfinite_counts(records),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def nonfinite_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """inf/NaN that dequant wrote from finite codes (`--allow-nonfinite`), per output file and
    tensor, reused shards included (their journal records carry the counts)."""
    tensors = [{"file": r.get("name"), "tensor": name, "count": n}
               for r in records for name, n in sorted((r.get("nonfinite") or {}).items())]
    return {"values": sum(t["count"] for t in tensors), "tensors": tensors}


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (not the Prefect server's, a separate process).

    VmHWM, not getrusage: Linux carries the parent's high-water mark into a child's ru_maxrss
    across fork + exec, so a child of a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

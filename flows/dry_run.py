"""`ckptflow convert … --dry-run`: what a conversion would do, from its plan alone.

Pure: a `Preflight` in (headers read, every pass planned, no Prefect, no torch), a dict out.
The numbers are the ones a real run's summary reports on a fresh DEST: output files and their
bytes, bytes read from SOURCE, bytes a pass parks in the work location, and what happens to
each tensor (dequantized, cast, sliced, moved to another file, copied where it was, dropped).
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from ckptflow.tasks.plan.model import StagePlan
from ckptflow.tasks.plan.transforms import Action, action_of
from ckptflow.tasks.planners.quant_summary import written_scheme

from ckptflow.flows.preflight import Preflight
from ckptflow.flows.printable import printable
from ckptflow.flows.summary_text import human, print_dropped_unmatched

MAX_FILES_LISTED = 8  # per pass in the text form; --json lists every file


def tensor_actions(plan: StagePlan) -> dict[str, int]:
    """How many output tensors each kind of work makes (as the transform registry names it: every
    quantized format counts as dequantized), plus the source tensors dropped. The run's summary
    counts with this too."""
    counts = Counter(action_of(t, shard.file) for shard in plan.shards for t in shard.tensors)
    counts["dropped"] = len(plan.dropped)
    order = (*Action.ORDER, "dropped")
    return {k: counts.get(k, 0) for k in order} | {k: v for k, v in counts.items() if k not in order}


def dry_run_report(planned: Preflight, source: str, dest: str, work: str) -> dict[str, Any]:
    passes = []
    for i, p in enumerate(planned.passes):
        passes.append({
            "stage": p.plan.stage, "into": "work" if p.into_work else "DEST",
            "location": f"{work.rstrip('/')}/stages/{p.plan.stage}" if p.into_work else dest,
            "files": [s.file for s in p.plan.shards], "shards": len(p.plan.shards),
            "tensors": sum(len(s.tensors) for s in p.plan.shards),
            "bytes_in": p.plan.source_bytes, "bytes_out": p.plan.total_size,
            "actions": tensor_actions(p.plan), "index": p.plan.write_index,
        })
    final = planned.passes[-1].plan
    return {
        "dry_run": True, "source": source, "dest": dest, "work": work,
        "stage": "+".join(planned.recipe.stages()), "passes": passes,
        "source_tensors": sum(len(h.tensors) for h in planned.ckpt.headers.values()),
        "source_bytes": planned.passes[0].plan.source_bytes,
        "output_bytes": final.total_size, "output_shards": len(final.shards),
        "output_tensors": sum(len(s.tensors) for s in final.shards),
        "work_bytes": sum(p.plan.total_size for p in planned.passes if p.into_work),
        "dropped_unmatched": [n for p in planned.passes for n in p.plan.dropped_unmatched],
        "warnings": list(planned.warnings),
        "quantize": written_scheme(final, planned.recipe.ignore),
    }


def print_written_scheme(q: dict[str, Any], out: Any, detail: bool = False) -> None:
    """The `quant_summary.written_scheme` dict as text: one line, and with `detail` (inspect) the
    counts, what stays unquantized and why, and the fused groups sharing a global scale."""
    shown = ", ".join(q["ignore"][:8]) + (f", … ({len(q['ignore'])} in all)" if len(q["ignore"]) > 8 else "")
    print(f"quantize: compressed-tensors {q['preset']} ({q['format']}); unquantized: {shown}", file=out)
    if not detail:
        return
    w, n = q["weights"] or {}, q["quantized"]
    print(f"  weights:   {w.get('type')} {w.get('num_bits')}-bit, strategy {w.get('strategy')}"
          + (f", group {w['group_size']}" if w.get("group_size") else "")
          + (f", block {w['block_structure']}" if w.get("block_structure") else ""), file=out)
    print(f"  quantized: {n['tensors']} tensors, {human(n['bytes_in'])} → {human(n['bytes_out'])} "
          "with scales", file=out)
    for why, k in q["unquantized"].items():
        names = ", ".join(printable(e) for e in k["examples"]) + (", …" if k["tensors"] > len(k["examples"]) else "")
        print(f"  kept ({why}): {k['tensors']} tensors, {human(k['bytes'])} (e.g. {names})", file=out)
    g = q["shared_global_scales"]
    if g is not None:
        ex = "; ".join(" + ".join(printable(m) for m in grp) for grp in g["examples"][:1])
        print(f"  global scales: {g['groups']} fused groups ({g['tensors']} tensors) share one each"
              + (f" (e.g. {ex})" if ex else ""), file=out)


def print_dry_run(report: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"dry run: {report['stage']} of {printable(report['source'])} ({report['source_tensors']} tensors); "
          "nothing written", file=out)
    for i, p in enumerate(report["passes"], 1):
        acts = ", ".join(f"{v} {k}" for k, v in p["actions"].items() if v)
        print(f"pass {i}:   {p['stage']} → {p['into']} ({printable(p['location'])})", file=out)
        print(f"          {p['shards']} files, {p['tensors']} tensors, "
              f"{human(p['bytes_in'])} read → {human(p['bytes_out'])} written; {acts}", file=out)
        files = [printable(f) for f in p["files"]]
        shown = ", ".join(files[:MAX_FILES_LISTED]) + (f", … ({len(files)} in all)"
                                                       if len(files) > MAX_FILES_LISTED else "")
        print(f"          files: {shown}", file=out)
    print(f"bytes:    {human(report['source_bytes'])} read from SOURCE, {human(report['output_bytes'])} "
          f"into DEST, {human(report['work_bytes'])} in the work location"
          + (" (deleted after success)" if report["work_bytes"] else ""), file=out)
    if report.get("quantize"):
        print_written_scheme(report["quantize"], out)
    print_dropped_unmatched(report["dropped_unmatched"], out)
    for w in report["warnings"]:
        print(f"warning:  {w}", file=out)

"""The block a conversion prints at the end: what this run did, what it reused, what the user waited.

Every number describes this run: a cached rerun reads and writes nothing and says so; shards and
tensors reused from an earlier run are counted apart; each pass of a multi-pass run has its own
line. `time` is the wall clock since the CLI started (what the user waited), with the
part Prefect took (imports, temporary server, flow-run bookkeeping) named beside the part spent
converting. Lines stay short: a long DEST goes on its own line, so no label wraps.
"""
from __future__ import annotations

import sys
from typing import Any

from ckptflow.flows.printable import printable


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def timing(summary: dict[str, Any], flow_called_at: float, flow_returned_at: float,
           server: tuple[str, str | None] = ("yours", None)) -> dict[str, Any]:
    """Where the user's wait went, all in seconds since the CLI started: `before_flow` (Python, imports,
    reading headers and planning), `prefect` (from calling the flow to its body starting, and
    from its body ending to the call returning: Prefect's imports, temporary server, flow-run
    records), `flow` (the flow body: shard tasks, finalize, read-back verify). `server` is which
    Prefect server the run used (flows/runtime/server.py): "temporary", "local" or "yours", and its URL."""
    flow_s = float(summary.get("seconds", 0.0))
    return {"server": server[0], "server_url": server[1], "before_flow_s": round(flow_called_at, 3),
            "prefect_s": round(max(0.0, flow_returned_at - flow_called_at - flow_s), 3),
            "flow_s": round(flow_s, 3), "waited_s": round(flow_returned_at, 3)}


def _pass_lines(i: int, p: dict[str, Any]) -> list[str]:
    return [f"pass {i}:   {p['stage']} → {p['into']}: {p['shards']} shards ({p['cached_shards']} reused), "
            f"{p['tensors']} tensors written",
            f"          {human(p['source_bytes'])} read → {human(p['bytes_written'])} written"]


def print_dropped_unmatched(names: list[str], out: Any = None) -> None:
    """Every tensor --drop-unmatched left out, by name: a dropped weight must never pass unseen."""
    if names:
        print(f"dropped:  {len(names)} tensor(s) no preset row matches (--drop-unmatched), not written:",
              file=out or sys.stdout)
        for name in names:
            print(f"          {printable(name)}", file=out or sys.stdout)


_SERVER_WORDS = {"temporary": "temporary server", "local": "local server", "yours": "your server"}


def print_summary(summary: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    gbps = summary.get("gb_per_s_in")
    t = summary.get("timing") or {}
    dest = printable(summary["dest"])
    print("output:" + (f"   {dest}" if len(dest) <= 60 else f"\n  {dest}"), file=out)
    passes = summary.get("passes") or []
    if len(passes) > 1:
        for i, p in enumerate(passes, 1):
            print("\n".join(_pass_lines(i, p)), file=out)
    for i, p in enumerate(passes, 1):  # what the plan does to tensors: --fix-dtypes says what it cast
        acts = ", ".join(f"{v} {k}" for k, v in (p.get("actions") or {}).items() if v and k != "copied")
        if acts:
            print(f"plan:     {acts}" if len(passes) == 1 else f"plan {i}:   {acts}", file=out)
    reused = summary.get("cached_shards", 0)
    print(f"shards:   {summary['shards'] - reused} written, {reused} reused from an earlier run", file=out)
    print(f"tensors:  {summary['tensors']} written, {summary.get('reused_tensors', 0)} reused "
          f"({summary['dropped_tensors']} source tensors folded in or dropped)", file=out)
    print_dropped_unmatched(summary.get("dropped_unmatched") or [], out)
    print(f"bytes:    {human(summary['source_bytes'])} read → {human(summary['bytes_written'])} written"
          + (f" ({human(summary['reused_bytes'])} reused)" if summary.get("reused_bytes") else ""), file=out)
    if t:
        print(f"time:     {t['waited_s']:.1f} s waited: {t['flow_s']:.1f} s converting, "
              f"{t['prefect_s']:.1f} s Prefect ({_SERVER_WORDS.get(t.get('server'), 'server')}, runs)", file=out)
        print(f"          {t['before_flow_s']:.1f} s start-up + planning, ", end="", file=out)
    else:
        print(f"time:     {summary['seconds']:.2f} s in the flow, ", end="", file=out)
    print(f"{summary['shard_seconds']:.2f} s in shard tasks"
          + (f" ({gbps:.3f} GB/s in)" if gbps else ""), file=out)
    bad = summary.get("nonfinite") or {}
    if bad.get("values"):
        shown = ", ".join(f"{t['tensor']} ({t['count']})" for t in bad["tensors"][:5])
        print(f"nonfinite: {bad['values']} inf/NaN value(s) from finite codes written (--allow-nonfinite) in "
              f"{len(bad['tensors'])} tensor(s): {shown}" + (", …" if len(bad["tensors"]) > 5 else ""), file=out)
    for note in summary.get("notes", []):
        print(f"note:     {note}", file=out)
    print("dtypes:   " + ", ".join(f"{k}×{v}" for k, v in summary["dtypes"].items()), file=out)
    for w in summary.get("warnings", []):
        print(f"warning:  {w}", file=sys.stderr)

"""The progress bars a CLI conversion shows on stderr: bytes written and shards committed.

Totals come from the plan the CLI made before Prefect started, so the very first frame already
reads `0/6`, never a bare counter. A rate and an ETA are shown only once a share of the total has
moved: a run's first bytes (a small norm tensor, seconds after the flow began while Prefect
submitted the first task) measure start-up, not throughput, and on a 700 GB checkpoint they
promised an ETA of 19705 hours. tqdm's own smoothing takes over from there.
"""
from __future__ import annotations

from typing import Any

from tqdm import tqdm

# Share of a bar's total done before its rate and ETA mean something (1% of DeepSeek-V3's 688 GB
# is 7 GB: seconds at a real rate; 1 shard of a handful).
SETTLED = 0.01


class Bar(tqdm):
    """A tqdm bar that says `?` for its rate and ETA until SETTLED of its total is done."""

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        if d.get("total") and d["n"] < SETTLED * d["total"]:
            # 0, not None: with None tqdm falls back to n / elapsed, the very estimate to avoid
            d["rate"] = 0
        return d


def open_bars(total_bytes: int, total_shards: int, disable: bool | None = None) -> tuple[Bar, Bar]:
    """Both bars, totals set from the first frame. `disable=None`: shown only on a terminal.
    leave=False: a finished bar makes room for the summary (`progress.detach` clears and closes)."""
    return (Bar(total=total_bytes, unit="B", unit_scale=True, desc="bytes ", disable=disable, leave=False),
            Bar(total=total_shards, unit="shard", desc="shards", disable=disable, leave=False))

"""Prefect artifacts for a run: the dtype report, a summary and live progress, per flow run in the UI."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from ckptflow.tasks.planners.torch_dtype import DtypeReport


def publish_dtype_report(report: DtypeReport, url: str) -> None:
    create_table_artifact(key="dtypes", table=report.rows(), description=f"dtypes of {url}")
    create_markdown_artifact(key="dtype-check", markdown=f"### dtype check of `{url}`\n\n{report.markdown()}",
                             description="verify dtypes against config.json")


def publish_summary(summary: dict[str, Any]) -> None:
    rate = summary.get("gb_per_s_in")
    lines = [
        f"### ckptflow {summary['stage']}: `{summary['source']}` → `{summary['dest']}`", "",
        "| | |", "|---|---|",
        f"| shards | {summary['shards']} ({summary['cached_shards']} cache hits) |",
        f"| tensors | {summary['tensors']} |",
        f"| bytes read → written | {summary['source_bytes']:,} → {summary['bytes_written']:,} |",
        f"| time | {summary['seconds']} s ({summary['shard_seconds']} s in shard tasks) |",
        f"| throughput | {rate if rate is not None else '–'} GB/s of input |",
        f"| dtypes | {', '.join(f'{k}×{v}' for k, v in summary['dtypes'].items())} |",
    ]
    bad = summary.get("nonfinite") or {}
    if bad.get("values"):  # written only with --allow-nonfinite: the artifact must say so
        lines.append(f"| inf/NaN from finite codes | {bad['values']} in "
                     + ", ".join(f"`{t['file']}`: `{t['tensor']}` ({t['count']})" for t in bad["tensors"][:50]) + " |")
    create_markdown_artifact(key="convert-summary", markdown="\n".join(lines), description="conversion summary")


class RunProgress:
    """The run's `convert-progress` artifact, advanced as each output shard commits (or is found
    committed by an earlier run); percent is by bytes, since shards differ in size.

    The artifact is for watching a run, not part of its result: an API hiccup while updating it
    is logged and the conversion goes on.
    """

    def __init__(self, shards: int, total_bytes: int, key: str = "convert-progress"):
        self.shards, self.total_bytes = shards, max(total_bytes, 1)
        self.done_shards = self.done_bytes = 0
        self.artifact_id = self._call(lambda: create_progress_artifact(0.0, key=key, description=self.description()))

    def description(self) -> str:
        return (f"{self.done_shards}/{self.shards} shards committed, "
                f"{self.done_bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB")

    def percent(self) -> float:
        return round(min(100.0, 100.0 * self.done_bytes / self.total_bytes), 2)

    def shard_committed(self, record: dict[str, Any]) -> None:
        self.done_shards += 1
        self.done_bytes += int(record.get("size", 0))
        if self.artifact_id is not None:
            self._call(lambda: update_progress_artifact(self.artifact_id, self.percent(),
                                                        description=self.description()))

    @staticmethod
    def _call(fn: Any) -> Any:
        """`fn()`, or None (logged) when the API call fails."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - observability must not fail the conversion
            get_run_logger().warning("progress artifact not updated: %s", exc)
            return None

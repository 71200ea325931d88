"""Prefect artifacts for a run: the dtype report and a summary, visible in the UI per flow run."""
from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.dtypes import DtypeReport


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
    create_markdown_artifact(key="convert-summary", markdown="\n".join(lines), description="conversion summary")

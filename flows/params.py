"""Typed flow parameters: what a deployment run's `--param` and the UI's form are checked against.

Prefect turns each flow's signature into a JSON schema; the constraints here (patterns, bounds,
choices) go into that schema, so a bad value is rejected before a run is created, on the server
as well as in-process. `ConvertOptions` is the convert recipe as one model, for flows that start
conversions (the watch flow) and pass the same options to each.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskRunnerKind = Literal["threads", "processes", "dask"]
DequantBackend = Literal["auto", "torch", "triton"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                              description="where to dequantize: auto (CUDA if visible), cpu, cuda[:N]")]
# As ckptflow.tasks.planners.reindex.parse_size reads it: 5GB (10⁹-based), 1.5GiB (2³⁰-based), 500MB, 123.
ShardSize = Annotated[str, Field(pattern=r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*([KkMmGgTt][Ii]?)?[Bb]?\s*$",
                                 description="largest output shard, e.g. 5GB, 500MB, 1.5GiB")]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


class ConvertOptions(BaseModel):
    """The recipe and runtime options of `convert_flow`, minus source, dest, work and storage."""

    model_config = ConfigDict(extra="forbid")

    dequant: bool = True
    fix_dtypes: bool = False
    allow_dtypes: list[str] | None = None
    reindex: bool = False
    max_shard_size: ShardSize = "5GB"
    fused_groups: str | None = None
    mp: Positive | None = None
    preset: str = "deepseek-v3"
    drop_unmatched: bool = False
    allow_missing_scale: bool = False
    fetch: bool = False
    checksum: bool = False
    device: Device = "auto"
    dequant_backend: DequantBackend = "auto"
    task_runner: TaskRunnerKind = "threads"
    dask_address: str | None = None
    max_workers: Positive | None = None
    prune: bool = False

    def recipe_key(self) -> dict[str, object]:
        """The options that change the output's bytes (not where or how fast it is computed)."""
        return self.model_dump(include={"dequant", "fix_dtypes", "allow_dtypes", "reindex", "max_shard_size",
                                        "fused_groups", "mp", "preset", "drop_unmatched",
                                        "allow_missing_scale"})

"""The convert options, written once: CLI flags, flow parameters and the recipe all come from here.

`Recipe` holds what changes the output's bytes; `ConvertOptions` adds where and how fast they are
computed. From these fields, and nothing else:
- `ckptflow convert` / `watch` build their flags, choices, help and defaults (`ckptflow.flows.cli`);
- `convert_flow`'s signature is generated (`flow_signature`), so Prefect's parameter schema, the
  UI's form and a deployment run's `--param` checks carry the same names, types, bounds and
  defaults; a bad value is rejected before a run is created, on the server as in-process;
- the watch flow takes a `ConvertOptions` whole and passes it on to each conversion.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from ckptflow.tasks.plan.sizes import SIZE_HELP, SIZE_PATTERN

TaskRunnerKind = Literal["threads", "processes", "dask"]
QuantizeScheme = Literal["fp8-block", "fp8-channel", "nvfp4", "mxfp4"]  # tasks/presets/quant_schemes.json
Rounding = Literal["fp32", "llmcompressor-cpu"]
DequantBackend = Literal["auto", "torch", "triton"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                              description="where to dequantize: auto (CUDA if visible), cpu, cuda[:N]")]
ShardSize = Annotated[str, Field(pattern=SIZE_PATTERN, description=f"largest output shard, {SIZE_HELP}")]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
# A flow's `runtime` (the CLI's `Runtime`, ckptflow.flows.runtime.process): any value to validation
# (`runtime_of` checks it) and no property in the parameter schema Prefect builds for a deployment
# (its UI form, `prefect deployment inspect`): only an in-process caller can pass one.
RuntimeParameter = SkipJsonSchema[Any]


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line, where the default spelling does not fit."""

    name: str | None = None        # default: --field-name
    metavar: str | None = None
    repeat: bool = False           # a list: the flag may be given more than once


class Recipe(BaseModel):
    """What a conversion does to the bytes: the stages and their options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dequant: bool = Field(False, description="quantized → BF16: FP8 block/tensor/channel, NVFP4, MXFP4 "
                                             "(gpt-oss, compressed-tensors) (see `ckptflow inspect`)")
    fix_dtypes: bool = Field(False, description="cast tensors to config.json's torch_dtype")
    allow_dtypes: Annotated[tuple[str, ...] | None, Flag("--allow-dtype", "REGEX", repeat=True)] = Field(
        None, description="tensor names allowed to differ from config.json's torch_dtype (repeatable)")
    reindex: bool = Field(False, description="put every fused group (q/k/v, gate/up, …) in one file")
    max_shard_size: Annotated[ShardSize, Flag(metavar="SIZE")] = Field(
        "5GB", description=f"--reindex: largest output shard, {SIZE_HELP}")
    fused_groups: Annotated[str | None, Flag(metavar="FILE|URL")] = Field(
        None, description="--reindex: JSON table of fused groups, a path or fsspec URL (default: built in)")
    mp: Annotated[Positive | None, Flag(metavar="N")] = Field(
        None, description="write model-parallel rank files model{r}-mp{N}.safetensors")
    preset: Annotated[str | None, Flag(metavar="NAME|FILE|URL")] = Field(
        None, description="--mp: name table, deepseek-v3, llama or a JSON file (path or fsspec URL); default: "
                          "the built-in one config.json's model_type names")
    drop_unmatched: bool = Field(False, description="--mp: drop tensors no preset row matches (each listed; "
                                                    "refused where a fused partner is kept)")
    allow_missing_scale: bool = Field(False, description="--dequant: keep FP8 tensors that have no scale as FP8")
    allow_nonfinite: bool = Field(False, description="--dequant: write what zero, negative or NaN/inf scales (or "
                                                     "BF16 overflow) make instead of refusing; inf/NaN are counted")
    quantize: QuantizeScheme | None = Field(
        None, description="quantize Linear weights as llm-compressor's model_free_ptq writes them (compressed-"
                          "tensors FP8_BLOCK, FP8_DYNAMIC weights, NVFP4A16, MXFP4A16); fused groups share "
                          "NVFP4 global scales and stay in one file (--max-shard-size bounds the files)")
    rounding: Rounding = Field("fp32", description="--quantize: divide in FP32 (one rounding), or as "
                                                   "llm-compressor's CPU path does (bit for bit)")
    ignore: Annotated[tuple[str, ...] | None, Flag("--ignore", "PATTERN", repeat=True)] = Field(
        None, description="--quantize: also leave these modules unquantized (name, glob or re:REGEX; repeatable)")

    def stages(self) -> list[str]:
        return [s for s, on in (("dequant", self.dequant), ("fix-dtypes", self.fix_dtypes),
                                ("reindex", self.reindex and not self.mp), ("quantize", self.quantize is not None),
                                ("mp", bool(self.mp))) if on]


class ConvertOptions(Recipe):
    """The recipe plus runtime options of `convert_flow`, minus source, dest, work and storage."""

    fetch: bool = Field(False, description="copy a remote SOURCE into the work location first")
    checksum: bool = Field(False, description="record each output shard's sha256 (a rerun then proves "
                                              "reused shards by content)")
    device: Annotated[Device, Flag(metavar="DEVICE")] = Field(
        "auto", description="where to dequantize: auto (CUDA if visible), cpu, cuda[:N]")
    dequant_backend: DequantBackend = Field("auto", description="dequant kernel: auto, torch (lookup "
                                                                "tables) or triton")
    task_runner: TaskRunnerKind = Field(
        "threads", description="where shard tasks run: threads of this process, a process pool, or Dask "
                               "workers (local workers share this run's temporary Prefect server; "
                               "--dask-address needs PREFECT_API_URL)")
    dask_address: Annotated[str | None, Flag(metavar="tcp://HOST:PORT")] = Field(
        None, description="--task-runner dask: the scheduler of an existing cluster (default: a LocalCluster)")
    max_workers: Annotated[Positive | None, Flag(metavar="N")] = Field(
        None, description="shard tasks at once (threads: default 1, a CPU shard task already uses every "
                          "core; raise it for object storage. processes / dask LocalCluster: worker "
                          "processes, default 2)")
    prune: bool = Field(False, description="delete weight files in DEST this conversion does not write "
                                           "(an earlier layout's)")

    def recipe(self) -> Recipe:
        return Recipe(**self.model_dump(include=set(Recipe.model_fields)))

    def recipe_key(self) -> dict[str, object]:
        """The options that change the output's bytes (not where or how fast it is computed)."""
        return self.recipe().model_dump(mode="json")


def flag_of(name: str, info: Any) -> Flag:
    """The command-line spelling of a field (`--field-name` unless the field says otherwise)."""
    found = next((m for m in info.metadata if isinstance(m, Flag)), Flag())
    return Flag(found.name or "--" + name.replace("_", "-"), found.metavar, found.repeat)


def flow_signature(fn: Callable[..., Any], model: type[BaseModel]) -> inspect.Signature:
    """`fn`'s own parameters, then one keyword parameter per field of `model`, typed and with its
    default: what Prefect builds the flow's parameter schema from and validates a run against."""
    # eval_str: real annotations, as Prefect reads a plain flow's (a string such as
    # "RuntimeParameter" would reach its schema as an untyped property)
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    fields = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info.default,
                                annotation=Annotated[(info.annotation, *info.metadata,
                                                      Field(description=info.description))])
              for name, info in model.model_fields.items()]
    return inspect.Signature(own + fields)

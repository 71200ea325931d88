"""Verify dtypes: every floating tensor against config.json's `torch_dtype`, from headers alone.

Seed 004's failure: expert weights restored as float32 under a bfloat16 config. The check is
pure (a `Checkpoint` in, a `DtypeReport` out); `fix_dtypes` turns any stage's plan into one that
casts the mismatched tensors on the way through, so fixing costs no extra pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import FLOAT_DTYPES, FP8_DTYPES

from ckptflow.tasks.plan.model import OutputTensor, PlanError, ShardPlan, StagePlan
from ckptflow.tasks.plan.transforms import CAST, COPY
from ckptflow.tasks.presets.dtype_exceptions import builtin_dtype_exceptions
from ckptflow.tasks.planners.quant_layout import is_packed, scale_siblings
from ckptflow.tasks.planners.quant_scheme import claims_unquantized

# config.json dtype names → safetensors dtype strings
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32",
                 "float64": "F64", "double": "F64"}
SCALE_SUFFIXES = ("_scale_inv", "_scale", "_scale_2", ".scales")  # .scales: GPTQ / AWQ (F16 by design)
# Mismatch reasons of tensors holding codes under a config that declares no quantization
PACKED_NO_CONFIG = "packed quantized codes without a quantization_config"
FP8_NO_CONFIG = "FP8 without a quantization_config"
INT_NO_CONFIG = "integer codes with a scale beside them, without a quantization_config"
QUANTIZED_REASONS = (PACKED_NO_CONFIG, FP8_NO_CONFIG, INT_NO_CONFIG)


def scale_names(name: str) -> tuple[str, ...]:
    """Where an FP8 tensor's scale may be: `x.weight_scale_inv` (HF), `x.scale` (inference names)."""
    return tuple(name + s for s in SCALE_SUFFIXES) + (name.rsplit(".", 1)[0] + ".scale",)


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIXES) or name.endswith(".scale")


def _dtype_name(value: Any, where: str) -> str:
    name = str(value).removeprefix("torch.")
    if name not in CONFIG_DTYPES:
        raise PlanError(f"config.json: {where} is {value!r}; expected one of {', '.join(sorted(CONFIG_DTYPES))}")
    return CONFIG_DTYPES[name]


@dataclass(frozen=True)
class ExpectedDtypes:
    """What dtype each tensor should have: a default plus longest-prefix overrides (dict form)."""

    default: str | None
    by_prefix: tuple[tuple[str, str], ...] = ()
    allowed_f32: tuple[str, ...] = ()        # regexes of tensors that are float32 by design
    fp8_allowed: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, extra_allowed: tuple[str, ...] = (),
                    quant_config: dict[str, Any] | None = None) -> "ExpectedDtypes":
        """`quant_config`: ModelOpt's hf_quant_config.json, which declares quantization too."""
        config = config or {}
        raw = config.get("torch_dtype", config.get("dtype"))
        default, prefixes = None, []
        if isinstance(raw, dict):  # {"": "bfloat16", "vision_tower": "float16", …}
            for key, value in raw.items():
                dt = _dtype_name(value, f"torch_dtype[{key!r}]")
                if key in ("", "default"):
                    default = dt
                else:
                    prefixes.append((key, dt))
        elif raw is not None:
            default = _dtype_name(raw, "torch_dtype")
        allowed = builtin_dtype_exceptions().allowed_f32(str(config.get("model_type", ""))) + tuple(extra_allowed)
        for pattern in allowed:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PlanError(f"--allow-dtype pattern {pattern!r} is not a valid regex: {exc}") from None
        return cls(default, tuple(sorted(prefixes, key=lambda kv: -len(kv[0]))), allowed,
                   not claims_unquantized(config) or bool(quant_config))

    def for_tensor(self, name: str) -> str | None:
        for prefix, dt in self.by_prefix:
            if name.startswith(prefix) or f".{prefix}." in f".{name}":
                return dt
        return self.default

    def allows_f32(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.allowed_f32)


@dataclass(frozen=True)
class Mismatch:
    file: str
    tensor: str
    dtype: str
    expected: str
    reason: str = ""

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.file}: tensor {self.tensor!r} is {self.dtype}, config says {self.expected}{why}"


@dataclass
class DtypeReport:
    expected: str | None
    table: dict[str, list[int]] = field(default_factory=dict)   # dtype → [tensors, bytes]
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def quantized_line(self) -> str | None:
        n = sum(m.reason in QUANTIZED_REASONS for m in self.mismatches)
        return f"{n} tensor(s) are quantized/integer but config.json has no quantization_config" if n else None

    def rows(self) -> list[dict[str, Any]]:
        return [{"dtype": d, "tensors": c, "bytes": b} for d, (c, b) in sorted(self.table.items())]

    def text(self) -> str:
        lines = [f"config torch_dtype: {self.expected or '(not set)'}", f"{'dtype':8}{'tensors':>9}{'bytes':>16}"]
        lines += [f"{r['dtype']:8}{r['tensors']:>9}{r['bytes']:>16,}" for r in self.rows()]
        if self.mismatches:
            lines += [line for line in (self.quantized_line(),) if line]
            lines.append(f"{len(self.mismatches)} mismatch(es):")
            lines += [f"  - {m}" for m in self.mismatches]
        else:
            lines.append("all floating tensors match the config")
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [f"**config torch_dtype**: `{self.expected or 'not set'}`", "", "| dtype | tensors | bytes |",
               "|---|---:|---:|"]
        out += [f"| {r['dtype']} | {r['tensors']} | {r['bytes']:,} |" for r in self.rows()]
        if self.mismatches:
            out += [f"\n**{line}**" for line in (self.quantized_line(),) if line]
            out += ["", f"**{len(self.mismatches)} mismatch(es)**", ""] + [f"- `{m}`" for m in self.mismatches[:200]]
        return "\n".join(out)


Entry = tuple[str, str, str, int]  # (file, tensor, dtype, nbytes)


def report_for(entries: list[Entry], config: dict[str, Any] | None,
               extra_allowed: tuple[str, ...] = (), quant_config: dict[str, Any] | None = None) -> DtypeReport:
    """The dtype report of tensors described by (file, name, dtype, nbytes) — written or planned."""
    exp = ExpectedDtypes.from_config(config, extra_allowed, quant_config)
    report = DtypeReport(exp.default)
    present = {name for _, name, _, _ in entries}  # a scale may sit in another shard
    for file, name, dtype, nbytes in sorted(entries, key=lambda e: e[1]):
        row = report.table.setdefault(dtype, [0, 0])
        row[0] += 1
        row[1] += nbytes
        want = exp.for_tensor(name)
        if not exp.fp8_allowed and dtype not in FP8_DTYPES:
            # gpt-oss blocks, NVFP4 packs, GPTQ qweights, int8 weights: a loader would take the codes
            # for weights; so would it an integer tensor with a scale beside it
            reason = PACKED_NO_CONFIG if is_packed(name, dtype) else INT_NO_CONFIG \
                if dtype not in FLOAT_DTYPES and any(s in present for s in scale_siblings(name, dtype)) else None
            if reason is not None:
                report.mismatches.append(Mismatch(file, name, dtype, want or "(not set)", reason))
                continue
        if dtype in FP8_DTYPES and not is_scale(name) and not exp.fp8_allowed:  # with no torch_dtype too
            report.mismatches.append(Mismatch(file, name, dtype, want or "(not set)", FP8_NO_CONFIG))
            continue
        if want is None or dtype not in FLOAT_DTYPES or dtype == want:
            continue
        if dtype in FP8_DTYPES and not is_scale(name):
            if not any(s in present for s in scale_names(name)):
                report.mismatches.append(Mismatch(file, name, dtype, want, "FP8 without its scale tensor"))
        elif not _by_design(exp, name, dtype):  # a scale keeps its format's dtype (NVFP4's are FP8)
            report.mismatches.append(Mismatch(file, name, dtype, want))
    return report


def _by_design(exp: ExpectedDtypes, name: str, dtype: str) -> bool:
    """Quantization scales and known float32 tensors keep their dtype whatever the config says."""
    return (is_scale(name) and exp.fp8_allowed) or (dtype == "F32" and exp.allows_f32(name))


def check_dtypes(ckpt: Checkpoint, extra_allowed: tuple[str, ...] = ()) -> DtypeReport:
    # every file's tensors: model-parallel rank files share names, each holding its own part
    entries = [(f, n, i.dtype, i.nbytes) for f, h in sorted(ckpt.headers.items()) for n, i in h.tensors.items()]
    return report_for(entries, ckpt.config, extra_allowed, ckpt.quant_config)


def check_plan(plan: StagePlan, config: dict[str, Any] | None, extra_allowed: tuple[str, ...] = (),
               quant_config: dict[str, Any] | None = None) -> DtypeReport:
    """The report the plan's output will get — known before a byte is written."""
    entries = [(s.file, t.name, t.dtype, t.spec.nbytes) for s in plan.shards for t in s.tensors]
    return report_for(entries, config, extra_allowed, quant_config)


def fix_dtypes(plan: StagePlan, config: dict[str, Any] | None, extra_allowed: tuple[str, ...] = ()) -> StagePlan:
    """Make `plan` cast every copied floating tensor whose dtype the config does not expect."""
    exp = ExpectedDtypes.from_config(config, extra_allowed)
    shards = []
    for shard in plan.shards:
        tensors = []
        for t in shard.tensors:
            want = exp.for_tensor(t.name)
            wrong = (t.transform == COPY.name and want is not None and t.dtype in FLOAT_DTYPES - FP8_DTYPES
                     and t.dtype != want and not _by_design(exp, t.name, t.dtype))
            tensors.append(replace(t, dtype=want, transform=CAST.name) if wrong else t)
        shards.append(ShardPlan(shard.file, tuple(tensors)))
    return replace(plan, shards=tuple(shards))


def identity_plan(ckpt: Checkpoint) -> StagePlan:
    """Every tensor copied as is, same files: the base a lone `--fix-dtypes` casts on top of."""
    from ckptflow.tasks.plan.model import SourceRef

    shards = tuple(ShardPlan(f, tuple(OutputTensor(n, i.dtype, tuple(i.shape), "copy", (SourceRef.of(f, i),))
                                      for n, i in h.tensors.items()))
                   for f, h in sorted(ckpt.headers.items()) if h.tensors)
    return StagePlan("copy", shards, None)

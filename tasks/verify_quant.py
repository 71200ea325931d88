"""`verify` on a quantized checkpoint (any compressed-tensors or ModelOpt one, not only ckptflow's).

Three checks, from headers and the few bytes of per-tensor scales:
- every fused group (the `reindex` table: q/k/v, gate/up of dense MLPs and of every routed and
  shared expert, MLA q_a + kv_a, w1/w3) shares its global scale. vLLM fuses the group into one
  Linear and keeps one global scale for it (the largest of the members'): a member quantized
  against another global scale then dequantizes wrongly. NVFP4 (`weight_global_scale`,
  ModelOpt `weight_scale_2`) mismatches are errors; per-tensor FP8 `weight_scale` mismatches are
  warnings, since vLLM requantizes such a group to the largest scale (correct, a little coarser).
- each scale grid fits its weight (block 128×128, per channel, groups of 16 / 32, ragged edges):
  the dequant layout's geometry checks (`quant_layout.detect`), the same ones `--dequant` runs;
- the quantization_config describes every packed / FP8 tensor; a module in its ignore list that
  holds packed weights is an error (a loader would take the codes for weights).

`check_layout` is pure (the scale bytes come from a `read` callable); `check_quantized` reads them
with bounded range reads, so it costs a few KB per thousand weights on s3:// too.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.reader import RangeReader
from ckptflow.storage.safetensors_format import FLOAT_DTYPES, FP8_DTYPES
from ckptflow.storage.transient import with_transient_retries
from ckptflow.storage.urls import Location
from ckptflow.tasks.kernels.finite import bad_scales
from ckptflow.tasks.plan.model import PlanError, SourceRef
from ckptflow.tasks.planners.quant_layout import QuantTensor, detect, is_packed
from ckptflow.tasks.planners.quant_scheme import UnsupportedScheme, read_scheme
from ckptflow.tasks.presets.fused_groups import FusedGroup, group_of, load_fused_groups
from ckptflow.tasks.run.scale_preflight import SMALL_BYTES, _spans
from ckptflow.tasks.validate import mp_world

SHOWN = 5          # mismatched groups named in the text; the count covers the rest
JSON_LIMIT = 200   # … and in --json, so a hostile checkpoint's report stays bounded
MAX_LINES = 50     # problem lines printed
# scheme row → the one-per-weight scale a fused group must share, and whether a mismatch fails verify
GLOBAL_SCALES = {"ct-nvfp4": (".weight_global_scale", "error"), "modelopt-nvfp4": (".weight_scale_2", "error")}
PER_TENSOR_FP8 = (".weight_scale", "warning")
CODE_SUFFIXES = (".weight_packed", ".weight", "_blocks")
DEQUANT_LIMIT = "block scales are not supported"  # quant_geometry.fp8_geometry's F16 refusal
PROBLEM_TENSOR = re.compile(r"tensor '([^']+)'")  # the tensor a `quant_layout` problem line names first

Read = Callable[[list[SourceRef]], dict[SourceRef, bytes]]


@dataclass(frozen=True)
class GroupMismatch:
    group: str                                   # fused-group id, e.g. "gate_up:model.layers.0.mlp.experts.3."
    scale: str                                   # the scale's suffix, e.g. ".weight_global_scale"
    members: tuple[tuple[str, str], ...]         # (module, its value or why it has none)
    severity: str

    def __str__(self) -> str:
        """e.g. "model.layers.0.mlp.experts.3. (gate_proj 41216, up_proj 38912)": members relative to the group."""
        prefix = self.group.split(":", 1)[-1]
        values = ", ".join(f"{m.removeprefix(prefix)} {v}" for m, v in self.members)
        return f"{prefix or self.group} ({values})"


@dataclass
class QuantReport:
    scheme: str | None = None                    # "<method> (<where>)", None when not quantized
    skipped: str | None = None                   # why nothing was checked
    quantized: int = 0                           # quantized weights found
    groups: int = 0                              # fused groups of two or more members checked
    scale: str | None = None                     # which scale the groups were checked on
    mismatched: list[GroupMismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # tensors whose grid was not checked, and why

    @property
    def errors(self) -> list[GroupMismatch]:
        return [m for m in self.mismatched if m.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> int:
        """Problems, counting all the fused groups that do not share their scale as one."""
        return len(self.problems) + bool(self.errors)

    def error_lines(self) -> list[str]:
        out = self.problems[:MAX_LINES] + ([f"… and {len(self.problems) - MAX_LINES} more quantization problems "
                                            f"(--json lists the first {JSON_LIMIT})"]
                                           if len(self.problems) > MAX_LINES else [])
        if self.errors:
            out.append(f"{len(self.errors)} of {self.groups} fused groups do not share one "
                       f"{self.scale.lstrip('.') if self.scale else 'global scale'} (vLLM applies one per fused "
                       f"module, so their other members dequantize wrongly): "
                       + "; ".join(str(m) for m in self.errors[:SHOWN])
                       + (f"; … and {len(self.errors) - SHOWN} more" if len(self.errors) > SHOWN else "")
                       + ". Requantize them with one global scale per fused group "
                         "(ckptflow convert SOURCE DEST --dequant --quantize nvfp4)")
        return out

    def text(self) -> str:
        if self.scheme is None:
            return ""
        lines = [f"quantization: {self.scheme}: {self.quantized} quantized weight(s)"]
        if self.skipped:
            return lines[0] + f"; not checked: {self.skipped}"
        if self.scale:
            shared = self.groups - len(self.mismatched)
            lines.append(f"fused groups sharing one {self.scale.lstrip('.')}: {shared} of {self.groups}")
            warned = [m for m in self.mismatched if m.severity == "warning"]
            if warned:
                lines.append(f"warning: {len(warned)} fused group(s) have different per-tensor FP8 scales "
                             "(vLLM requantizes each to the largest: correct, slightly coarser):")
                lines += [f"  - {m.scale.lstrip('.')} of {m}" for m in warned[:SHOWN]]
                lines += [f"  … and {len(warned) - SHOWN} more"] if len(warned) > SHOWN else []
        elif self.quantized:
            lines.append("fused groups: no per-weight scale to share (block, channel or group scales only)")
        if self.notes:
            lines.append(f"note: {len(self.notes)} scale grid(s) not checked (F16 block scales, which ckptflow's "
                         f"--dequant does not read), e.g. {self.notes[0]}")
        lines.append("scale grids fit and the config describes every quantized tensor" if not self.problems
                     else f"{len(self.problems)} quantization problem(s) (error lines above)")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "skipped": self.skipped, "ok": self.ok, "quantized": self.quantized,
                "fused_groups": self.groups, "shared_scale": self.scale and self.scale.lstrip("."),
                "groups_not_sharing": len(self.mismatched),
                "mismatched": [{"group": m.group, "severity": m.severity, "members": dict(m.members)}
                               for m in self.mismatched[:JSON_LIMIT]],
                "problems": self.problems[:JSON_LIMIT], "notes": self.notes[:JSON_LIMIT]}


def _module(name: str) -> str:
    for suffix in CODE_SUFFIXES:
        if name.endswith(suffix):
            return name[: len(name) - len(suffix)]
    return name


def _value(ref: SourceRef, raw: bytes) -> float | None:
    """The one value of a per-tensor scale, or None for a dtype no producer writes them in."""
    if ref.dtype == "F32":
        return float(np.frombuffer(raw, "<f4")[0])
    if ref.dtype == "BF16":
        return float((np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view("<f4")[0])
    if ref.dtype == "F16":
        return float(np.frombuffer(raw, "<f2")[0])
    return None


def _shared_scale(qt: QuantTensor) -> tuple[str, str] | None:
    if qt.variant.scheme.name in GLOBAL_SCALES:
        return GLOBAL_SCALES[qt.variant.scheme.name]
    if qt.variant.scheme.name in ("ct-fp8", "modelopt-fp8") and qt.variant.param("per") == "tensor":
        return PER_TENSOR_FP8
    return None


def check_layout(ckpt: Checkpoint, read: Read, groups: list[FusedGroup] | None = None) -> QuantReport:
    """What `verify` says about `ckpt`'s quantization; `read` returns the bytes of small scale tensors."""
    try:
        scheme = read_scheme(ckpt.config, ckpt.quant_config)
    except UnsupportedScheme as exc:  # GPTQ, AWQ, …: verify still checks their dtypes, not their scales
        return QuantReport(scheme="not one ckptflow reads", skipped=str(exc).split("; supported:")[0])
    except PlanError as exc:  # a malformed quantization_config: loaders cannot read it either
        return QuantReport(scheme="unreadable", problems=[str(exc)])
    if scheme is None:
        return QuantReport()  # packed tensors without a config: check_dtypes names them
    layout = detect(ckpt)
    report = QuantReport(scheme=f"{scheme.method} ({scheme.where})", quantized=len(layout.quantized))
    # A limit of ckptflow's dequant, not a defect of the checkpoint (llm-compressor stores an FP16
    # model's FP8 block scales in F16): a note, not a failure
    report.notes = [p for p in layout.problems if DEQUANT_LIMIT in p]
    report.problems = _described(ckpt, scheme, [p for p in layout.problems if DEQUANT_LIMIT not in p])
    groups = load_fused_groups() if groups is None else groups

    members: dict[str, list[tuple[str, SourceRef | None, QuantTensor | None]]] = {}
    for name, qt in layout.quantized.items():
        gid = group_of(name, groups)
        if gid is not None:
            which = _shared_scale(qt)
            ref = next((SourceRef.of(*a) for a in qt.aux if which and a[1].name.endswith(which[0])), None)
            members.setdefault(gid, []).append((_module(name), ref, qt))
    for name, (_, info) in ckpt.tensors().items():  # a member left unquantized beside quantized ones
        if name.endswith(".weight") and name not in layout.quantized and info.dtype in FLOAT_DTYPES - FP8_DTYPES:
            gid = group_of(name, groups)
            if gid in members:
                members[gid].append((_module(name), None, None))

    refs = [r for ms in members.values() for _, r, _ in ms if r is not None and r.end - r.start <= SMALL_BYTES]
    raw = read(refs) if refs else {}
    for ref in refs:
        if (what := bad_scales(ref.dtype, raw[ref])) is not None:
            report.problems.append(f"{ref.file}: tensor {ref.name!r} {what}: a scale must be finite and > 0")
    for gid, ms in sorted(members.items()):
        whiches = {_shared_scale(qt) for _, _, qt in ms if qt is not None}
        which = next(iter(whiches)) if len(whiches) == 1 else None
        if len(ms) < 2 or which is None:
            continue
        report.groups += 1
        report.scale = which[0]
        values = [(m, "unquantized" if qt is None else "not one value" if r not in raw
                   else _value(r, raw[r])) for m, r, qt in ms]
        if len({v for _, v in values}) > 1:
            report.mismatched.append(GroupMismatch(gid, which[0], tuple(sorted((m, _fmt(v)) for m, v in values)),
                                                   "error" if any(qt is None for _, _, qt in ms) else which[1]))
    return report


def _fmt(v: float | str | None) -> str:
    return v if isinstance(v, str) else "(unreadable dtype)" if v is None else f"{v:.9g}"


def _described(ckpt: Checkpoint, scheme: Any, problems: list[str]) -> list[str]:
    """`detect`'s problems, with the generic line about a packed tensor of an ignore-listed module
    replaced by one that says so: the config tells loaders that module is not quantized."""
    if scheme.ignore is None:
        return list(problems)
    ignored: dict[str, str] = {}  # module → its one problem line
    for name, (file, info) in ckpt.tensors().items():
        module = _module(name)
        if module != name and module not in ignored and is_packed(name, info.dtype) and scheme.ignore.matches(module):
            ignored[module] = (f"{file}: tensor {name!r} is {info.dtype} (packed/quantized) but module {module!r} is "
                               f"in the ignore list of {scheme.where}: a loader takes it as unquantized and would "
                               "read its codes as weights; remove the module from the ignore list or store it "
                               "unquantized")
    kept = [p for p in problems if not ((m := PROBLEM_TENSOR.search(p)) and
                                        (_module(m[1]) in ignored or m[1].rsplit(".", 1)[0] in ignored))]
    return kept + list(ignored.values())


def verify_quantization(ckpt: Checkpoint, loc: Location, checkable: bool = True) -> QuantReport:
    """`check_layout` with the scales read from `loc` (merged range reads of a few bytes each).
    Not run over headers with errors (their byte ranges cannot be trusted), nor over model-parallel
    rank files, whose inference names (`wq`, `.scale`) are not the layout a quantization_config describes."""
    if not checkable:
        return QuantReport()
    if mp_world(ckpt):
        return QuantReport(scheme="model-parallel rank files", skipped="rank files keep inference names")
    return check_layout(ckpt, lambda refs: read_small(loc, refs))


def read_small(loc: Location, refs: list[SourceRef]) -> dict[SourceRef, bytes]:
    by_file: dict[str, list[SourceRef]] = {}
    for ref in refs:
        by_file.setdefault(ref.file, []).append(ref)
    jobs = [(file, span) for file, rs in sorted(by_file.items()) for span in _spans(rs)]
    out: dict[SourceRef, bytes] = {}
    with RangeReader(loc) as reader, ThreadPoolExecutor(min(8, len(jobs))) as pool:
        reads = pool.map(lambda job: with_transient_retries(lambda: bytes(reader.read(job[0], job[1][0], job[1][1]))),
                         jobs)
        for (_, (start, _, group)), raw in zip(jobs, reads):
            for ref in group:
                out[ref] = raw[ref.start - start: ref.end - start]
    return out

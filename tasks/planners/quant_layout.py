"""Match a declared scheme against the headers: per quantized module, its scales and geometry.

Pure (a `Checkpoint` in, a `QuantLayout` out). Geometry comes from the config and is checked by
the scheme row's `geometry` (`quant_geometry`) against each scale grid's shape with ceil division;
it is never inferred by dividing a shape by a grid (wrong on ragged edges).Every tensor that cannot
be handled becomes one problem line, so the planner can refuse them all at once, before anything is
written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import FLOAT_DTYPES, TensorInfo
from ckptflow.tasks.planners.quant_geometry import Geometry
from ckptflow.tasks.planners.quant_scheme import (ACTIVATION_SUFFIXES, FP8, SCHEMES, SchemeConfig, Variant,
                                                  read_scheme)

Located = tuple[str, TensorInfo]  # (file, header entry)
PACKED_SUFFIXES = ("_blocks", "_scales", ".weight_packed", ".qweight", ".qzeros", ".scales", ".g_idx",
                   ".weight_global_scale", ".weight_scale_2", ".weight_zero_point", ".weight_shape")
INT_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
# What sits beside codes in the schemes ckptflow knows and those it refuses (GPTQ, AWQ, int8 W8A16):
# a tensor with one of these beside it is quantized, whatever its own dtype says.
WEIGHT_SCALES = (".weight_scale", ".weight_scale_inv", ".weight_zero_point", ".weight_global_scale",
                 ".weight_scale_2")
CODE_SUFFIXES = (".weight_packed", ".qweight", "_blocks", ".weight")
INT_SIBLINGS = WEIGHT_SCALES + ("_scales", ".scales", ".qzeros")


@dataclass(frozen=True)
class QuantTensor:
    """One quantized weight and how it becomes a BF16 tensor."""

    variant: Variant
    main: Located
    aux: tuple[Located, ...]
    out_name: str
    out_shape: tuple[int, ...]
    params: tuple[tuple[str, Any], ...]
    transform: str


@dataclass
class QuantLayout:
    scheme: SchemeConfig | None
    quantized: dict[str, QuantTensor] = field(default_factory=dict)   # main tensor name → plan
    consumed: set[str] = field(default_factory=set)                    # scale tensors folded in
    activations: list[str] = field(default_factory=list)               # dropped: act / KV scales
    kept: list[str] = field(default_factory=list)                      # kept quantized (--allow-missing-scale)
    problems: list[str] = field(default_factory=list)


def is_packed(name: str, dtype: str) -> bool:
    """A tensor that only makes sense with a quantization config (codes or packing): integer
    weights are codes too (int8 W8A16, …); integer buffers (position ids) are not weights."""
    return dtype in FP8 or dtype == "F8_E8M0" or (dtype in ("U8", "I8", "I32") and name.endswith(PACKED_SUFFIXES)) \
        or (dtype in INT_DTYPES and name.endswith(".weight"))


def scale_siblings(name: str, dtype: str) -> tuple[str, ...]:
    """Where a scale or zero point of tensor `name` would sit. A floating tensor counts only the
    weight-scale family (`x.weight_scale…`, DeepSeek's `X_scale_inv`): names distinctive enough
    that a model's own float parameters never use them. An integer tensor is codes with any scale."""
    out = [name + "_scale_inv"]
    for suffix in CODE_SUFFIXES:
        if name.endswith(suffix):
            base = name[: len(name) - len(suffix)]
            out += [base + s for s in (WEIGHT_SCALES if dtype in FLOAT_DTYPES else INT_SIBLINGS)]
            break
    if dtype not in FLOAT_DTYPES:
        out.append(name + "_scale")
    return tuple(dict.fromkeys(out))


def uncovered(tensors: dict[str, Located], handled: set[str], scheme: SchemeConfig | None) -> list[str]:
    """A problem line for every tensor left to be copied that holds codes: one with a scale or zero
    point beside it, an integer weight, an FP8 or packed tensor. Copied raw under a config that no
    longer declares quantization, a loader would take its codes for weights."""
    desc = (f"the quantization_config ({scheme.method}, {scheme.where}) does not describe it" if scheme
            else "config.json has no quantization_config that describes it")
    problems = []
    for name, (file, info) in tensors.items():
        if name in handled or name.endswith(ACTIVATION_SUFFIXES):
            continue
        beside = next((s for s in scale_siblings(name, info.dtype) if s in tensors), None)
        if beside is not None:
            kind = "integer" if info.dtype not in FLOAT_DTYPES else "floating"
            problems.append(f"{file}: tensor {name!r} is {info.dtype} ({kind}) with a scale beside it ({beside!r}) but "
                            f"{desc}; it would be copied as raw codes and its scale left unused")
        elif is_packed(name, info.dtype):
            problems.append(f"{file}: tensor {name!r} is {info.dtype}, quantized, packed or integer codes, but {desc}")
    return problems


def detect(ckpt: Checkpoint, allow_missing_scale: bool = False) -> QuantLayout:
    scheme = read_scheme(ckpt.config, ckpt.quant_config)
    tensors = ckpt.tensors()
    if scheme is None and any(i.dtype in FP8 for _, i in tensors.values()):
        # No config at all: the FP8 layout ckptflow always read (DeepSeek's, 128×128 blocks).
        scheme = SchemeConfig("fp8 (no quantization_config)", "headers",
                              (Variant(SCHEMES["fp8-block"], (("block", (128, 128)),)),))
    layout = QuantLayout(scheme)
    if scheme is None:
        layout.problems += uncovered(tensors, set(), None)
        return layout
    weight_map = ckpt.weight_map()
    flagged: set[str] = set()  # tensors with a problem line already
    seen: dict[tuple, Geometry] = {}
    for name, (file, info) in tensors.items():
        if name.endswith(ACTIVATION_SUFFIXES):
            layout.activations.append(name)
            continue
        candidates = [v for v in scheme.variants
                      if name.endswith(v.scheme.main) and info.dtype in v.scheme.main_dtypes]
        if not candidates:
            continue
        base = name[: len(name) - len(candidates[0].scheme.main)]
        module = base.rstrip("_")
        if scheme.ignore is not None and scheme.ignore.matches(module):
            continue  # left unquantized by the config: flagged below if it is packed anyway
        chosen = [v for v in candidates if v.targets is None or v.targets.matches(module)]
        if not chosen:
            layout.problems.append(f"{file}: tensor {name!r} ({info.dtype}) is in no config group of "
                                   f"{scheme.method} ({scheme.where})")
            flagged.add(name)
            continue
        errors = []
        for v in chosen:  # several groups may target the same class: the one whose tensors fit wins
            result = _match(v, base, (file, info), tensors, weight_map, seen)
            if isinstance(result, QuantTensor):
                layout.quantized[name] = result
                layout.consumed.update(a[1].name for a in result.aux)
                break
            errors.append(result)
        else:
            missing_only = all(e.startswith("missing:") for e in errors)
            if missing_only and allow_missing_scale:
                layout.kept.append(name)
            else:
                flagged.add(name)
                flagged.update(base + suffix for v in chosen for suffix, _ in v.scheme.aux)
                layout.problems.append(errors[0].removeprefix("missing:")
                                       + ("; pass --allow-missing-scale to keep it as FP8"
                                          if missing_only and info.dtype in FP8 else ""))
    handled = layout.quantized.keys() | layout.consumed | set(layout.kept) | flagged
    layout.problems += uncovered(tensors, handled, scheme)
    return layout


def _match(v: Variant, base: str, main: Located, tensors: dict[str, Located],
           weight_map: dict[str, str], seen: dict[tuple, Geometry]) -> QuantTensor | str:
    """The plan of one weight under `v`, or a problem line (prefixed `missing:` when a scale is absent).
    `seen` memoizes geometry by dtypes and shapes: a checkpoint repeats a few shapes ~100k times."""
    file, info = main
    aux: list[Located] = []
    for suffix, dtypes in v.scheme.aux:
        aux_name = base + suffix
        if aux_name not in tensors:
            where = weight_map.get(aux_name)
            return (f"missing:{file}: tensor {info.name!r} is {info.dtype} but its scale {aux_name!r} is not in "
                    "the checkpoint" + (f" (the index says {where}, which lacks it)" if where else ""))
        aux_file, aux_info = tensors[aux_name]
        if aux_info.dtype not in dtypes:
            return (f"{aux_file}: tensor {aux_name!r} is {aux_info.dtype}; {v.scheme.name} scales must be "
                    f"{' or '.join(sorted(dtypes))} ({v.label or v.scheme.name})")
        aux.append((aux_file, aux_info))
    key = (id(v), info.dtype, tuple(info.shape)) + tuple((a[1].dtype, tuple(a[1].shape)) for a in aux)
    if key not in seen:
        try:
            seen[key] = v.scheme.geometry(v, info, [a[1] for a in aux])
        except ValueError as exc:  # not memoized: the message names this tensor
            return f"{file}: {exc} ({v.scheme.name})"
    shape, params, transform = seen[key]
    return QuantTensor(v, main, tuple(aux), base + v.scheme.out, shape, params, transform)

"""What a checkpoint's quantization config says, as a table of known schemes. Pure, no I/O.

Read from config.json's `quantization_config` (top level or under `text_config`, as multimodal
configs nest it) and ModelOpt's `hf_quant_config.json`. Each scheme is a row of `SCHEMES`: which
tensor holds the codes, which tensors hold its scales (and their allowed dtypes), what it becomes.
The config gives the geometry (block, group size); `quant_layout` checks it against the headers.
Anything not in the table (GPTQ, AWQ, int4 packs, …) is refused by name, never guessed at.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.planners.linear_match import Matcher, compile_patterns
from ckptflow.tasks.planners.quant_geometry import (Geometry, ct_mxfp4_geometry, fp8_geometry, mxfp4_geometry,
                                                    nvfp4_geometry)

FP8 = frozenset({"F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class Scheme:
    """One known scheme: `base + main` holds codes, `base + suffix` for each aux the scales."""

    name: str
    main: str                                         # suffix of the code tensor
    main_dtypes: frozenset[str]
    aux: tuple[tuple[str, frozenset[str]], ...]       # (suffix, allowed dtypes) of each scale tensor
    out: str                                          # suffix of the BF16 tensor written
    geometry: Callable[..., Geometry]                 # (variant, codes, scales) → shape, params, transform


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    # DeepSeek-V3/V3.1/V3.2, Qwen3 FP8, Kimi-K2, MiniMax-M2, GLM: block scales, stored as the reciprocal.
    # Any FP8 tensor `X` with `X_scale_inv` (DeepSeek names stacked experts too, not only `.weight`).
    Scheme("fp8-block", "", FP8, (("_scale_inv", frozenset({"F32", "BF16", "F8_E8M0"})),), "", fp8_geometry),
    # compressed-tensors float-quantized (llm-compressor): tensor / channel / block / group strategies.
    Scheme("ct-fp8", ".weight", FP8, ((".weight_scale", frozenset({"F32", "BF16", "F16"})),), ".weight",
           fp8_geometry),
    # compressed-tensors nvfp4-pack-quantized: E2M1 pairs, FP8 scale per 16, a global scale divides.
    Scheme("ct-nvfp4", ".weight_packed", frozenset({"U8"}),
           ((".weight_scale", frozenset({"F8_E4M3"})), (".weight_global_scale", frozenset({"F32"}))),
           ".weight", nvfp4_geometry),
    # compressed-tensors mxfp4-pack-quantized: E2M1 pairs, a uint8 E8M0 exponent per 32, no global scale.
    Scheme("ct-mxfp4", ".weight_packed", frozenset({"U8"}), ((".weight_scale", frozenset({"U8"})),), ".weight",
           ct_mxfp4_geometry),
    # ModelOpt FP8 per-tensor and NVFP4 (weight_scale_2 multiplies).
    Scheme("modelopt-fp8", ".weight", FP8, ((".weight_scale", frozenset({"F32"})),), ".weight", fp8_geometry),
    Scheme("modelopt-nvfp4", ".weight", frozenset({"U8"}),
           ((".weight_scale", frozenset({"F8_E4M3"})), (".weight_scale_2", frozenset({"F32"}))),
           ".weight", nvfp4_geometry),
    # gpt-oss MXFP4 experts: `*_blocks` [E, OUT, G, 16], `*_scales` E8M0 [E, OUT, G].
    Scheme("mxfp4", "_blocks", frozenset({"U8"}), (("_scales", frozenset({"U8"})),), "", mxfp4_geometry),
)}

# Activation / KV-cache quantization parameters: meaningless in a BF16 model, dropped and listed.
ACTIVATION_SUFFIXES = (".input_scale", ".input_global_scale", ".input_zero_point", ".output_scale",
                       ".output_zero_point", ".k_scale", ".v_scale", ".q_scale", ".kv_scale", ".prob_scale")


@dataclass(frozen=True)
class Variant:
    """A scheme as one config (group) uses it: geometry and which modules it targets."""

    scheme: Scheme
    geometry: tuple[tuple[str, Any], ...]      # ("block", (bm, bn)) | ("per", "tensor"|"channel") | ("group", g)
    targets: Matcher | None = None             # compressed-tensors targets; None = every module
    label: str = ""                            # how the config names it, for messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "_params", dict(self.geometry))  # looked up per tensor

    def param(self, key: str) -> Any:
        return self._params.get(key)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SchemeConfig:
    method: str                                # quant_method as the config spells it
    where: str                                 # which file / key it was read from
    variants: tuple[Variant, ...]
    ignore: Matcher | None = None              # modules left unquantized


def _positive_pair(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value)):
        raise PlanError(f"{where} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _positive(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{where} must be a positive integer, got {value!r}")
    return value


class UnsupportedScheme(PlanError):
    """A scheme outside the table (GPTQ, AWQ, …): `verify` still checks such a checkpoint's dtypes."""


def unsupported(method: str, where: str, why: str = "") -> PlanError:
    return UnsupportedScheme(f"{where}: quantization scheme {method!r} is not one ckptflow can dequantize"
                     + (f" ({why})" if why else "")
                     + "; supported: FP8 block (quant_method fp8), compressed-tensors float-quantized FP8, "
                       "nvfp4-pack-quantized and mxfp4-pack-quantized, gpt-oss mxfp4, ModelOpt FP8 and NVFP4. "
                       "Nothing was written")


def quantization_sources(config: dict[str, Any] | None,
                         quant_config: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """Every quantization description present, as (where, object)."""
    out: list[tuple[str, dict[str, Any]]] = []
    config = config or {}
    for where, holder in (("config.json", config), ("config.json text_config", config.get("text_config"))):
        q = holder.get("quantization_config") if isinstance(holder, dict) else None
        if q is not None:
            if not isinstance(q, dict):
                raise PlanError(f"{where}: quantization_config must be an object, got {type(q).__name__}")
            out.append((f"{where} quantization_config", q))
    if quant_config is not None:
        q = quant_config.get("quantization")
        if not isinstance(q, dict):
            raise PlanError('hf_quant_config.json: "quantization" must be an object with "quant_algo"')
        out.append(("hf_quant_config.json", {**q, "quant_method": "modelopt"}))
    return out


def claims_unquantized(config: dict[str, Any] | None) -> bool:
    """True when config.json declares no quantization, at the top or under `text_config`."""
    config = config or {}
    text = config.get("text_config")
    return not (config.get("quantization_config") or (isinstance(text, dict) and text.get("quantization_config")))


def read_scheme(config: dict[str, Any] | None, quant_config: dict[str, Any] | None) -> SchemeConfig | None:
    """The scheme the checkpoint declares, or None when it declares none; raises on unknown ones."""
    sources = quantization_sources(config, quant_config)
    if not sources:
        return None
    where, q = sources[0]  # config.json first; hf_quant_config.json only when config.json says nothing
    method = str(q.get("quant_method", "fp8" if "weight_block_size" in q else ""))
    ignore = _patterns(q.get("ignore") or q.get("modules_to_not_convert") or q.get("exclude_modules") or [],
                       f"{where}.ignore")
    if method == "fp8":
        block = _positive_pair(q.get("weight_block_size") or [128, 128], f"{where}.weight_block_size")
        return SchemeConfig(method, where, (Variant(SCHEMES["fp8-block"], (("block", block),)),), ignore)
    if method == "mxfp4":
        return SchemeConfig(method, where, (Variant(SCHEMES["mxfp4"], (("group", 32),)),), ignore)
    if method == "modelopt":
        return _modelopt(q, where, ignore)
    if method == "compressed-tensors":
        return _compressed_tensors(q, where, ignore)
    raise unsupported(method or "(no quant_method)", where)


def _modelopt(q: dict[str, Any], where: str, ignore: Matcher) -> SchemeConfig:
    algo = str(q.get("quant_algo") or "")
    if algo == "FP8":
        return SchemeConfig("modelopt FP8", where, (Variant(SCHEMES["modelopt-fp8"], (("per", "tensor"),)),), ignore)
    if algo == "NVFP4":
        group = _positive(q.get("group_size", 16), f"{where}.group_size")
        if group != 16:
            raise unsupported(f"modelopt NVFP4 group_size {group}", where, "NVFP4 groups are 16 elements")
        return SchemeConfig("modelopt NVFP4", where, (Variant(SCHEMES["modelopt-nvfp4"], (("group", 16),)),), ignore)
    raise unsupported(f"modelopt {algo or '(no quant_algo)'}", where)


def _compressed_tensors(q: dict[str, Any], where: str, ignore: Matcher) -> SchemeConfig:
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise PlanError(f"{where}: compressed-tensors config has no config_groups; cannot tell the scheme")
    fmt = q.get("format")
    variants = []
    for gname, group in sorted(groups.items()):
        label = f"compressed-tensors {gname}"
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise PlanError(f"{where}.config_groups.{gname}: needs a \"weights\" object")
        w = group["weights"]
        gfmt = group.get("format") or fmt
        kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
        desc = f"compressed-tensors {gfmt} ({kind} {bits}-bit, {strategy})"
        if w.get("symmetric") is False:
            raise unsupported(desc, f"{where}.config_groups.{gname}", "asymmetric: zero points")
        targets = (_patterns(group["targets"], f"{where}.config_groups.{gname}.targets", classes_match=True)
                   if group.get("targets") else None)
        if gfmt in ("float-quantized", "naive-quantized") and kind == "float" and bits == 8:
            geometry = _ct_fp8_geometry(w, strategy, f"{where}.config_groups.{gname}", desc)
            variants.append(Variant(SCHEMES["ct-fp8"], geometry, targets, label))
        elif gfmt == "nvfp4-pack-quantized" and kind == "float" and bits == 4:
            group_size = _positive(w.get("group_size", 16), f"{where}.config_groups.{gname}.weights.group_size")
            if group_size != 16 or strategy not in ("tensor_group", "group"):
                raise unsupported(desc, f"{where}.config_groups.{gname}", "NVFP4 is tensor_group of 16")
            variants.append(Variant(SCHEMES["ct-nvfp4"], (("group", 16),), targets, label))
        elif gfmt == "mxfp4-pack-quantized" and kind == "float" and bits == 4:
            variants.append(Variant(SCHEMES["ct-mxfp4"], (("group", _ct_mxfp4_group(w, f"{where}.config_groups.{gname}",
                                                                                  desc)),), targets, label))
        else:
            raise unsupported(desc, f"{where}.config_groups.{gname}")
    return SchemeConfig(f"compressed-tensors {fmt}", where, tuple(variants), ignore)


def _ct_fp8_geometry(w: dict[str, Any], strategy: Any, where: str, desc: str) -> tuple[tuple[str, Any], ...]:
    if strategy in ("tensor", "channel"):
        return (("per", strategy),)
    if strategy == "block":
        return (("block", _positive_pair(w.get("block_structure"), f"{where}.weights.block_structure")),)
    if strategy == "group":
        return (("block", (1, _positive(w.get("group_size"), f"{where}.weights.group_size"))),)
    raise unsupported(desc, where, f"strategy {strategy!r}")


# how compressed-tensors writes the E8M0 scale dtype into the config (QuantizationArgs.scale_dtype)
UINT8_NAMES = (None, "torch.uint8", "uint8")


def _ct_mxfp4_group(w: dict[str, Any], where: str, desc: str) -> int:
    """MXFP4 is groups of 32 with uint8 E8M0 scales: compressed-tensors decodes a scale as an
    exponent only then (`should_generate_mx_scales`); any other scale dtype it would misread."""
    group = _positive(w.get("group_size"), f"{where}.weights.group_size")
    if group != 32 or w.get("strategy") not in ("group", None):
        raise unsupported(desc, where, f"MXFP4 is group strategy with group_size 32, got {w.get('strategy')!r} "
                                       f"{group}")
    if w.get("scale_dtype") not in UINT8_NAMES:
        raise unsupported(desc, where, f"MXFP4 scales are uint8 E8M0 exponents, the config says scale_dtype "
                                       f"{w.get('scale_dtype')!r}")
    return group


def _patterns(value: Any, where: str, classes_match: bool = False) -> Matcher:
    """A config's module pattern list, compiled for linear-time matching (refused here, before
    any tensor is planned, when a pattern is outside what that matcher reads)."""
    if not isinstance(value, list):
        raise PlanError(f"{where} must be a list of module names or patterns, got {type(value).__name__}")
    return compile_patterns(value, where, classes_match)

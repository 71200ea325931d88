"""Which tensors `--quantize` quantizes, and what each scheme writes for one. Pure, no I/O.

Quantized: a floating 2-D Linear weight (`….weight`), or a stacked 3-D expert weight (`…experts…`).
Never: embeddings, `lm_head`, norms, biases, MoE router gates (`mlp.gate`, `block_sparse_moe.gate`,
`shared_expert_gate`, `router`), anything else; `--ignore PATTERN` (compressed-tensors' pattern
language, `linear_match`) adds modules. llm-compressor's `model_free_ptq` quantizes every 2-D
`.weight` its `ignore` does not name, `embed_tokens` and router gates included; transformers then
loads such an embedding wrongly, so this rule is stricter by default.

Schemes are data (`tasks/presets/quant_schemes.json`): the config group and format llm-compressor
writes, and the column multiple the FP4 groups need (NVFP4 16, MXFP4 32).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ckptflow.tasks.planners.linear_match import Matcher, compile_patterns

FLOATS = frozenset({"BF16", "F16", "F32"})
# module-name tails never quantized (why: loaders keep these unquantized; a router gate is tiny
# and precision-critical, vLLM reads it as a plain Linear)
_NEVER = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|lm_head|output|router|gate|shared_expert_gate)$"
                    r"|norm[^.]*$|(^|\.)(mlp|block_sparse_moe)\.gate$")
# of those, the ones that are not Linear modules (a loader targeting Linear skips them unlisted)
_NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|lm_head)$|norm[^.]*$")
_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")


@dataclass(frozen=True)
class QuantScheme:
    name: str                       # the --quantize choice
    preset: str                     # compressed-tensors' preset name
    format: str                     # quantization_config.format
    kernel: str                     # fp8_block | fp8_channel | nvfp4 | mxfp4
    col_multiple: int               # columns must be a multiple of this (FP4 group size)
    config_group: dict[str, Any]

    @property
    def packed(self) -> bool:
        return self.kernel in ("nvfp4", "mxfp4")

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Can a weight of `shape` take the scheme's column groups (NVFP4 16, MXFP4 32)?"""
        return shape[-1] % self.col_multiple == 0

    def outputs(self, base: str, dtype: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...], str]]:
        """(name, dtype, shape, role) of each tensor written for weight `base`.weight of `shape`:
        role "weight", "scale" or "global"."""
        *lead, rows, cols = shape
        lead_t = tuple(lead)
        if self.kernel == "fp8_block":
            return [(f"{base}.weight", "F8_E4M3", shape, "weight"),
                    (f"{base}.weight_scale", dtype, (*lead_t, -(-rows // 128), -(-cols // 128)), "scale")]
        if self.kernel == "fp8_channel":
            return [(f"{base}.weight", "F8_E4M3", shape, "weight"),
                    (f"{base}.weight_scale", dtype, (*lead_t, rows, 1), "scale")]
        out = [(f"{base}.weight_packed", "U8", (*lead_t, rows, cols // 2), "weight")]
        if self.kernel == "nvfp4":
            return out + [(f"{base}.weight_scale", "F8_E4M3", (*lead_t, rows, cols // 16), "scale"),
                          (f"{base}.weight_global_scale", "F32", (1,), "global")]
        return out + [(f"{base}.weight_scale", "U8", (*lead_t, rows, cols // 32), "scale")]


@cache
def _table() -> dict[str, Any]:
    text = resources.files("ckptflow.tasks.presets").joinpath("quant_schemes.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def scheme_names() -> tuple[str, ...]:
    return tuple(_table())


def quant_scheme(name: str) -> QuantScheme:
    row = _table()[name]
    return QuantScheme(name, row["preset"], row["format"], row["kernel"], int(row["col_multiple"]),
                       row["config_group"])


def never_quantized(module: str) -> bool:
    """Embeddings, lm_head, norms and router gates, by name."""
    return _NEVER.search(module) is not None


def listed_in_ignore(module: str) -> bool:
    """A 2-D weight left unquantized that the written `ignore` list must name: a router gate is a
    Linear, and transformers / vLLM would otherwise build it as a quantized one."""
    return _NOT_LINEAR.search(module) is None


# why a never-quantized module is left out, first match wins (`inspect --quantize` reports these)
_WHY_NEVER = (("embedding", re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe)$")),
              ("lm_head", re.compile(r"(^|\.)(lm_head|output)$")),
              ("norm", re.compile(r"norm[^.]*$")))


def why_unquantized(name: str, dtype: str, shape: tuple[int, ...], ignore: Matcher | None) -> str | None:
    """None if tensor `name` is a Linear weight `--quantize` quantizes; else why it stays as it is
    (bias, not floating, not a Linear weight, embedding, lm_head, norm, router gate, --ignore)."""
    if name.endswith(".bias"):
        return "bias"
    if dtype not in FLOATS:
        return "not floating-point"
    if not name.endswith(".weight"):
        return "not a Linear weight"
    module = name[: -len(".weight")]
    if never_quantized(module):  # by name first: a norm's 1-D weight is reported as a norm
        return next((why for why, rx in _WHY_NEVER if rx.search(module)), "router gate")
    if len(shape) != 2 and not (len(shape) == 3 and _EXPERTS.search(module)):
        return "not a Linear weight"
    if ignore is not None and ignore.matches(module):
        return "--ignore"
    return None


def is_target(name: str, dtype: str, shape: tuple[int, ...], ignore: Matcher | None) -> bool:
    """Is tensor `name` a Linear weight `--quantize` quantizes?"""
    return why_unquantized(name, dtype, shape, ignore) is None


def ignore_matcher(patterns: tuple[str, ...] | None) -> Matcher | None:
    return compile_patterns(list(patterns), "--ignore") if patterns else None

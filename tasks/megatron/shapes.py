"""GPT-2's parameter shapes in Megatron's layout, from the config: what every tensor must match.

`convert_megatron` checks every tensor of every rank against these before it merges or copies
one: a tensor the config does not predict (a forged 3 GB layernorm, a rank cut the wrong way)
is refused naming the tensor, its shape and the expected one, instead of being written out.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ckptflow.tasks.plan.model import PlanError


class MegatronConvertError(PlanError):
    """The checkpoint cannot be converted to GPT-2 as it stands; the message names tensor and fix."""


# Each GPT-2 parameter's shape in Megatron's [out, in] layout (before any transpose), whole model:
# a COLUMN rule's ranks split dim 0 evenly, a ROW rule's dim 1. "rows" is the padded vocabulary
# (all ranks' word-embedding rows); "3*n_embd" the fused q, k, v rows.
_LAYER = "transformer.h.{layer}."
GPT2_SHAPES: dict[str, tuple[str, ...]] = {
    "transformer.wte.weight": ("rows", "n_embd"), "lm_head.weight": ("rows", "n_embd"),
    "transformer.wpe.weight": ("n_positions", "n_embd"),
    "transformer.ln_f.weight": ("n_embd",), "transformer.ln_f.bias": ("n_embd",),
    **{_LAYER + n: ("n_embd",) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                         "attn.c_proj.bias", "mlp.c_proj.bias")},
    _LAYER + "attn.c_attn.weight": ("3*n_embd", "n_embd"), _LAYER + "attn.c_attn.bias": ("3*n_embd",),
    _LAYER + "attn.c_proj.weight": ("n_embd", "n_embd"),
    _LAYER + "mlp.c_fc.weight": ("n_inner", "n_embd"), _LAYER + "mlp.c_fc.bias": ("n_inner",),
    _LAYER + "mlp.c_proj.weight": ("n_embd", "n_inner"),
}
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What the table routes each Megatron name to: name → (MegatronRule, GPT-2 target, layer).
Routing = Mapping[str, tuple[Any, str | None, int | None]]


def _shape_symbols(target: str, name: str, where: str) -> tuple[str, ...]:
    dims = GPT2_SHAPES.get(re.sub(r"^transformer\.h\.\d+\.", _LAYER, target))
    if dims is None:
        raise MegatronConvertError(f"{where}: model.{name} maps to {target}, which is not a GPT-2 parameter")
    return dims


def check_kinds(mapped: Routing, tensors: dict[str, list[torch.Tensor]], where: str) -> None:
    """Each tensor is a float tensor of GPT-2's rank for its target (before the config reads shapes)."""
    for name, (_, target, _) in mapped.items():
        if target is None:
            continue
        dims = _shape_symbols(target, name, where)
        for rank, t in enumerate(tensors[target]):
            if t.dim() != len(dims) or t.dtype not in WEIGHT_DTYPES:
                raise MegatronConvertError(
                    f"{where}: model.{name} (rank {rank}) is a {str(t.dtype).removeprefix('torch.')} "
                    f"tensor of shape {list(t.shape)}; {target} is a {len(dims)}-D float tensor "
                    f"[{', '.join(dims)}]")


def check_shapes(mapped: Routing, tensors: dict[str, list[torch.Tensor]], cfg: dict[str, Any], tp: int,
                 where: str) -> None:
    """Every rank's tensor has the shape the config predicts, TP split included."""
    rows = sum(p.shape[0] for p in tensors["transformer.wte.weight"])
    values = {**cfg, "rows": rows, "3*n_embd": 3 * cfg["n_embd"]}
    for name, (rule, target, _) in mapped.items():
        if target is None:
            continue
        dims = _shape_symbols(target, name, where)
        want, why = [values[d] for d in dims], list(dims)
        if rule.tp != "REPLICATED":
            dim = 0 if rule.tp == "COLUMN" else 1
            if want[dim] % tp:
                raise MegatronConvertError(f"{where}: model.{name}: {dims[dim]}={want[dim]} does not split "
                                           f"evenly over {tp} tensor-parallel ranks")
            want[dim], why[dim] = want[dim] // tp, f"{dims[dim]}/{tp}"
        for rank, t in enumerate(tensors[target]):
            if list(t.shape) != want:
                given = ", ".join(f"{k}={values[k]}" for k in dict.fromkeys(dims))
                raise MegatronConvertError(
                    f"{where}: model.{name} (rank {rank}) has shape {list(t.shape)}, expected {want} "
                    f"([{', '.join(why)}] with {given}); the tensor and the config disagree")

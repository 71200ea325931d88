"""What a `--quantize` write plan will write, as plain data: `convert --dry-run` and
`inspect --quantize` both print this (one copy). Pure: the plan in, a dict out, no I/O.

- the compressed-tensors scheme config.json will declare (preset, format, weights, ignore);
- the weights quantized (count, bytes read, bytes written with their scales);
- what stays as it is, grouped by why (`quant_targets.why_unquantized`: embedding, lm_head, norm,
  router gate, --ignore, bias, …), with a few names each;
- NVFP4: the fused groups (q/k/v, gate/up, …) whose members share one global scale.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ckptflow.storage.safetensors_format import DTYPE_SIZES
from ckptflow.tasks.plan.model import StagePlan
from ckptflow.tasks.plan.transforms import QUANT_CONST, QUANT_SCALE, QUANT_WEIGHT
from ckptflow.tasks.planners.quant_targets import ignore_matcher, why_unquantized

EXAMPLES = 3  # names kept per reason / group: enough to recognise, small on a 90k-tensor MoE


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def written_scheme(plan: StagePlan, ignore: Iterable[str] | None = None,
                   refused: Iterable[str] = ()) -> dict[str, Any] | None:
    """The scheme `plan` (a --quantize write plan) writes, or None when it declares none.

    `ignore`: the recipe's --ignore patterns (to say which tensors they left out); `refused`:
    modules planned as ignored only so the rest could be shown (`inspect`'s misfit shapes)."""
    qc = (plan.config or {}).get("quantization_config") if plan.config else None
    if not qc or not isinstance(qc.get("config_groups"), dict) or not qc["config_groups"]:
        return None
    (preset, group), = list(qc["config_groups"].items())[:1]
    refused = set(refused)
    matcher = ignore_matcher(tuple(ignore) if ignore else None)
    quantized = {"tensors": 0, "bytes_in": 0, "bytes_out": 0}
    kept: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    nvfp4 = False
    for shard in plan.shards:
        for t in shard.tensors:
            if t.transform == QUANT_WEIGHT.name:
                _, dtype, shape, _ = t.param("inner")
                quantized["tensors"] += 1
                quantized["bytes_in"] += _nbytes(dtype, shape)
                quantized["bytes_out"] += _nbytes(t.dtype, t.shape)
                members.setdefault(t.param("group"), []).append(t.param("weight"))
                nvfp4 = nvfp4 or t.param("kernel") == "nvfp4"
            elif t.transform in (QUANT_SCALE.name, QUANT_CONST.name):
                quantized["bytes_out"] += _nbytes(t.dtype, t.shape)
            else:
                module = t.name.removesuffix(".weight")
                why = ("refused shape" if module in refused
                       else why_unquantized(t.name, t.dtype, t.shape, matcher) or "kept")
                k = kept.setdefault(why, {"tensors": 0, "bytes": 0, "examples": []})
                k["tensors"] += 1
                k["bytes"] += _nbytes(t.dtype, t.shape)
                if len(k["examples"]) < EXAMPLES:
                    k["examples"].append(t.name)
    shared = {g: sorted(m) for g, m in members.items() if len(m) > 1} if nvfp4 else {}
    return {
        "preset": preset, "format": qc.get("format"), "config_group": group, "weights": group.get("weights"),
        "ignore": [m for m in qc.get("ignore") or [] if m not in refused],
        "quantized": quantized, "unquantized": dict(sorted(kept.items(), key=lambda kv: -kv[1]["tensors"])),
        "shared_global_scales": {"groups": len(shared), "tensors": sum(len(m) for m in shared.values()),
                                 "examples": [m for _, m in sorted(shared.items())[:EXAMPLES]]} if nvfp4 else None,
    }

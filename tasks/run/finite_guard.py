"""Dequant never fakes data silently: scales checked as they are read, inf/NaN outputs counted.

Small scales (global, `weight_scale_2`, per-tensor) are checked at planning (`scale_preflight`);
block and channel scales only arrive while a shard is computed, so each transform hands the
scale bytes it reads to `check_scales` before it uses them. A bad one raises, the shard's writer
aborts, and nothing from those bytes is published. Finite scales can still overflow BF16
(an E8M0 scale of 2^127): each transform bounds its chunk's products from the scales and, only
when they could overflow, counts the inf/NaN it wrote where the codes were finite (`record`).
With the plan's `allow_nonfinite` (`--allow-nonfinite`) nothing is refused: values are written
as computed and counted per tensor, for the shard record and the run summary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ckptflow.tasks.kernels.finite import bad_scales, nonfinite_bf16, nonfinite_codes
from ckptflow.tasks.plan.model import OutputTensor, PlanError, SourceRef

if TYPE_CHECKING:
    from ckptflow.tasks.run.execute import ExecContext

ALLOW = "allow_nonfinite"  # OutputTensor param set by plan_dequant(allow_nonfinite=True)
FIX = ("Fix the checkpoint (download it again), or pass --allow-nonfinite to write it anyway "
       "(the values are counted in the summary)")


class NonFiniteError(PlanError):
    """Dequant would write zeros, flipped signs or inf/NaN where the codes hold finite values."""


def allowed(t: OutputTensor) -> bool:
    return bool(t.param(ALLOW, False))


def scale_message(scale: SourceRef, weight: SourceRef, what: str) -> str:
    return (f"{scale.file}: tensor {scale.name!r} (scale of {weight.name!r}): {what}; dequantizing would "
            f"turn finite codes into zeros, flipped signs or inf/NaN")


def check_scales(t: OutputTensor, scale: SourceRef, raw: bytes | bytearray | memoryview | np.ndarray) -> None:
    """Raise `NonFiniteError` unless every value in `raw` (bytes of `scale`) is finite and > 0."""
    if allowed(t):
        return
    what = bad_scales(scale.dtype, raw)
    if what is not None:
        raise NonFiniteError(f"{scale_message(scale, t.sources[0], what)}; nothing from it was published. {FIX}")


def record(ctx: ExecContext, t: OutputTensor, out: np.ndarray, codes: np.ndarray | None = None) -> None:
    """Count `out`'s inf/NaN (BF16 bits) that finite `codes` (FP8 bytes, same elements) did not
    explain; refuse them unless the plan allows them."""
    n = nonfinite_bf16(out) - (nonfinite_codes(t.sources[0].dtype, codes) if codes is not None else 0)
    if n <= 0:
        return
    if not allowed(t):
        w = t.sources[0]
        raise NonFiniteError(f"{w.file}: tensor {w.name!r}: dequantizing gives {n} inf/NaN value(s) from finite "
                             f"codes (its scales overflow BF16); nothing from it was published. {FIX}")
    ctx.nonfinite[t.name] = ctx.nonfinite.get(t.name, 0) + n


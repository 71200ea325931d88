"""How each family of quantized formats turns a weight's header into its BF16 output's plan. Pure.

One function per family, named by its scheme rows (`quant_scheme.Scheme.geometry`): given the
codes' and scales' headers under a `Variant`, it checks the scale grid against the config's
geometry (ceil division, ragged edges) and returns the output shape, the params, and the name of
the transform that makes it (an entry of `tasks.plan.transforms`); a misfit raises ValueError
naming the tensor, which `quant_layout` turns into one problem line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptflow.storage.safetensors_format import TensorInfo
from ckptflow.tasks.kernels.scale_grid import normalise_scale
from ckptflow.tasks.plan.transforms import CT_MXFP4, DEQUANT_FP8, FP8_SCALED, MXFP4_GPT_OSS, NVFP4

if TYPE_CHECKING:  # only for hints: quant_scheme's table names these functions
    from ckptflow.tasks.planners.quant_scheme import Variant

Geometry = tuple[tuple[int, ...], tuple[tuple[str, Any], ...], str]  # (output shape, params, transform)


def fp8_geometry(v: Variant, info: TensorInfo, aux: list[TensorInfo]) -> Geometry:
    name, shape, scale = info.name, tuple(info.shape), tuple(aux[0].shape)
    per = v.param("per")
    if per is not None:  # multiplied in the scale's dtype (kernels/fp8_scaled.py): 2-D e4m3 only
        if len(shape) != 2 or info.dtype != "F8_E4M3":
            raise ValueError(f"{name}: per-{per} FP8 needs a 2-D F8_E4M3 weight, got {info.dtype} {list(shape)}")
        fits = (_numel(scale) == 1 and len(scale) <= 1) if per == "tensor" else scale in ((shape[0], 1), (shape[0],))
        if not fits:
            want = "[] or [1]" if per == "tensor" else f"[{shape[0]}, 1]"
            raise ValueError(f"{name}: per-{per} scale shape {list(scale)} does not fit weight {list(shape)} "
                             f"(expected {want})")
        return shape, (("per", per),), FP8_SCALED.name
    if len(shape) not in (2, 3):
        raise ValueError(f"{name}: FP8 block dequant needs a 2-D or 3-D weight, got shape {list(shape)}")
    if aux[0].dtype == "F16":  # compressed-tensors would multiply in float16: not the block formula
        raise ValueError(f"{aux[0].name}: F16 block scales are not supported (only F32, BF16)")
    block = normalise_scale(shape, scale, v.param("block"), name)
    return shape, (("block", block),), DEQUANT_FP8.name


def nvfp4_geometry(v: Variant, info: TensorInfo, aux: list[TensorInfo]) -> Geometry:
    name, shape = info.name, tuple(info.shape)
    scale, global_scale = (tuple(a.shape) for a in aux)
    if len(shape) != 2:
        raise ValueError(f"{name}: NVFP4 packed weight must be 2-D [rows, cols/2], got {list(shape)}")
    rows, cols = shape[0], shape[1] * 2
    group = v.param("group")
    want = (rows, -(-cols // group))
    if tuple(scale) != want:
        raise ValueError(f"{name}: scale shape {list(scale)} does not match weight [{rows}, {cols}] "
                         f"in groups of {group} (expected {list(want)})")
    if _numel(global_scale) != 1 or len(global_scale) > 1:
        raise ValueError(f"{name}: global scale has shape {list(global_scale)}, expected one element")
    convention = "modelopt" if v.scheme.name.startswith("modelopt") else "compressed-tensors"
    return (rows, cols), (("group", group), ("convention", convention)), NVFP4.name


def mxfp4_geometry(v: Variant, info: TensorInfo, aux: list[TensorInfo]) -> Geometry:
    name, shape, scales = info.name, tuple(info.shape), tuple(aux[0].shape)
    group = v.param("group")
    if len(shape) != 4 or shape[-1] * 2 != group:
        raise ValueError(f"{name}: MXFP4 blocks must be [experts, out, in/{group}, {group // 2}], "
                         f"got {list(shape)}")
    if tuple(scales) != tuple(shape[:-1]):
        raise ValueError(f"{name}: scales shape {list(scales)} does not match blocks {list(shape)} "
                         f"(expected {list(shape[:-1])})")
    experts, out, groups = shape[:3]
    return (experts, groups * group, out), (("group", group),), MXFP4_GPT_OSS.name  # [E, IN, OUT], as transformers


def ct_mxfp4_geometry(v: Variant, info: TensorInfo, aux: list[TensorInfo]) -> Geometry:
    """compressed-tensors mxfp4-pack-quantized: `weight_packed` [rows, cols/2], E8M0 `weight_scale`
    [rows, cols/32]. Whole groups only: compressed-tensors itself refuses a ragged last group."""
    name, shape, scale = info.name, tuple(info.shape), tuple(aux[0].shape)
    group = v.param("group")
    if len(shape) != 2:
        raise ValueError(f"{name}: MXFP4 packed weight must be 2-D [rows, cols/2], got {list(shape)}")
    rows, cols = shape[0], shape[1] * 2
    if cols % group:
        raise ValueError(f"{name}: {cols} columns are not a multiple of the MXFP4 group of {group} "
                         "(compressed-tensors cannot decompress it either)")
    want = (rows, cols // group)
    if scale != want:
        raise ValueError(f"{name}: scale shape {list(scale)} does not match weight [{rows}, {cols}] "
                         f"in groups of {group} (expected {list(want)})")
    return (rows, cols), (("group", group),), CT_MXFP4.name


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""`weight_dequant`: block-wise FP8 → BF16 on whichever backend fits, all bit-identical.

Backends:
- "triton": the Triton kernel (`ckptflow.tasks.kernels.fp8_triton`), on a CUDA device — or on the CPU
  under `TRITON_INTERPRET=1`, which is how it is tested here;
- "torch": the lookup-table path (`ckptflow.tasks.kernels.fp8_cpu`): on the CPU with numpy gathers; on a GPU the
  same tables (built on the CPU, so rounding and NaN bits match) gathered on the device;
- "auto": Triton on CUDA devices with FP8 support (sm89+) for e4m3 block scales, else "torch".

The other formats (`fp8_scaled_dequant`, `mxfp4_dequant`, `mxfp4_gpt_oss`, `nvfp4_dequant`) live
in `fp8_scaled.py` and `fp4.py` with the same backends, and are exported here.
"""
from __future__ import annotations

import os

import torch

from ckptflow.tasks.kernels.fp4 import mxfp4_dequant, mxfp4_gpt_oss, nvfp4_dequant
from ckptflow.tasks.kernels.fp8_cpu import block_tables, matrix_scales, torch_weight_dequant
from ckptflow.tasks.kernels.fp8_scaled import fp8_scaled_dequant
from ckptflow.tasks.kernels.scales import block_scale_float32

__all__ = ["BACKENDS", "block_scale_float32", "fp8_scaled_dequant", "mxfp4_dequant", "mxfp4_gpt_oss",
           "nvfp4_dequant", "resolve_backend", "weight_dequant"]

BACKENDS = ("auto", "torch", "triton")


def triton_usable(weight: torch.Tensor) -> bool:
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 9)
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, weight: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int]) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kernel_fits = (weight.dtype in (torch.float8_e4m3fn, torch.uint8) and block[0] == block[1]
                   and scale_inv.dim() == weight.dim())
    if backend == "auto":
        return "triton" if weight.device.type == "cuda" and kernel_fits and triton_usable(weight) else "torch"
    return backend


def _gpu_lut_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The table path on a GPU: tables from the CPU, one gather per element on the device."""
    (bm, bn), s = matrix_scales(tuple(weight.shape), scale_inv, block)
    rows, cols = weight.shape[-2:]
    mats = weight.reshape(-1, rows, cols)
    tables = torch.from_numpy(block_tables(s, weight.dtype, out_dtype)).to(weight.device).reshape(-1)
    rb, nb = s.shape[-2], s.shape[-1]
    dev = weight.device
    e = torch.arange(mats.shape[0], device=dev).view(-1, 1, 1) * (rb * nb)
    r = (torch.arange(rows, device=dev) // bm).view(1, -1, 1) * nb
    c = (torch.arange(cols, device=dev) // bn).view(1, 1, -1)
    codes = mats.view(torch.uint8).to(torch.int64)
    idx = codes if scale_inv.numel() == 1 else (e + r + c) * 256 + codes
    return tables[idx].view(out_dtype).reshape(weight.shape)


def weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int | tuple[int, int] = 128,
                   *, backend: str = "auto", out_dtype: torch.dtype = torch.bfloat16,
                   scale_dtype: str | None = None) -> torch.Tensor:
    """Dequantize `weight` (FP8, 2-D or 3-D) with per-block `scale_inv`; returns `out_dtype`.

    out[..., i, j] = out_dtype(float32(weight[..., i, j]) * float32(scale_inv[..., i // bm, j // bn])),
    rounded to nearest-even on every backend. A one-element `scale_inv` is a per-tensor scale.
    Scales may be float32, bfloat16 or float8_e8m0fnu (all widen to float32 exactly); raw E8M0
    bytes are accepted as uint8 with `scale_dtype="F8_E8M0"`. E8M0 255 is NaN, so its whole block
    comes out NaN. Ragged edges: the last block row/column covers what is left. A row range of the
    weight works with the scale rows of its block rows (the range must start on a block boundary).
    """
    scale_inv = block_scale_float32(scale_inv, scale_dtype, "scale_inv")
    block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    chosen = resolve_backend(backend, weight, scale_inv, block)
    if chosen == "triton":
        from ckptflow.tasks.kernels.fp8_triton import triton_weight_dequant

        if block[0] != block[1]:
            raise ValueError(f"the Triton kernel takes square blocks; got {block}: use backend='torch'")
        return triton_weight_dequant(weight.contiguous(), scale_inv.to(weight.device).contiguous(), block[0],
                                     out_dtype=out_dtype)
    if weight.device.type == "cpu":
        return torch_weight_dequant(weight, scale_inv, block, out_dtype)
    return _gpu_lut_dequant(weight, scale_inv, block, out_dtype)

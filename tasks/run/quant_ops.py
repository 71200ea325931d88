"""The quantize kernels the write pass and the planner call, in one place: compressed-tensors 0.19's
formulas and op order, both roundings (`tasks/kernels/quant_fp8.py`, `quant_fp4.py`, `quant_common.py`)."""
from __future__ import annotations

from ckptflow.tasks.kernels.quant_common import tensor_amax
from ckptflow.tasks.kernels.quant_fp4 import mxfp4_quantize, nvfp4_global_scale, nvfp4_quantize
from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize, fp8_channel_quantize

__all__ = ["fp8_block_quantize", "fp8_channel_quantize", "mxfp4_quantize", "nvfp4_global_scale", "nvfp4_quantize",
           "tensor_amax"]

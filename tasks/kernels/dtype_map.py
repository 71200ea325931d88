"""safetensors dtype strings ↔ torch dtypes (the only place that needs both)."""
from __future__ import annotations

import torch

ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    # E8M0 block scales (ue8m0). safetensors 0.8 writes this dtype but its loaders raise KeyError
    # on it, so read the bytes raw and pass scale_dtype="F8_E8M0" to the kernels.
    "F8_E8M0": torch.float8_e8m0fnu,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

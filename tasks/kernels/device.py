"""`--device auto|cpu|cuda[:n]` → the device shard tasks dequantize on, importing torch (1-3 s)
only when the answer depends on it."""
from __future__ import annotations

import os
import sys

from ckptflow.storage.errors import UserError

# Without one of these a CUDA (or ROCm) device cannot be visible to torch on Linux.
_GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def no_gpu_possible() -> bool:
    """True where no GPU can be visible (Linux without NVIDIA, ROCm or WSL GPU device nodes):
    torch need not be imported to know. Elsewhere, ask torch."""
    return sys.platform.startswith("linux") and not any(os.path.exists(n) for n in _GPU_NODES)


def cuda_available() -> bool:
    if no_gpu_possible():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """`--device auto|cpu|cuda[:n]` → the device shard tasks dequantize on."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not cuda_available():
            raise UserError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
        return device
    raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}")

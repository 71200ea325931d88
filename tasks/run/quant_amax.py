"""Read the amax pass's output (`--quantize nvfp4`): one F32 per quantized weight, named after it."""
from __future__ import annotations

import math
import struct

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.urls import Location
from ckptflow.tasks.plan.model import PlanError


def read_amax(loc: Location, written: Checkpoint) -> dict[str, float]:
    """weight name → max |value|, from the amax files the side pass wrote and verified."""
    out: dict[str, float] = {}
    for file, header in sorted(written.headers.items()):
        with loc.fs.open(loc.path(file), "rb") as fh:
            for name, info in header.tensors.items():
                fh.seek(info.start)
                (value,) = struct.unpack("<f", fh.read(4))
                if not math.isfinite(value):
                    raise PlanError(f"tensor {name!r} holds inf or NaN values; NVFP4 cannot scale it. "
                                    "Leave it out with --ignore, or fix the source")
                out[name] = value
    return out

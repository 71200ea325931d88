"""Read one block of a global tensor: the I/O beside `chunks_for`'s pure plan.

For tests, inspection and small tensors; a conversion's shard task streams the same pieces into
its output instead of building a tensor.
"""
from __future__ import annotations

import math

import torch

from ckptflow.storage.reader import RangeReader
from ckptflow.storage.urls import Location
from ckptflow.tasks.mcore.dcp_metadata import ITEMSIZE
from ckptflow.tasks.mcore.index import GlobalTensor
from ckptflow.tasks.mcore.regions import Region, chunks_for, full_region, region_shape

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_region(loc: Location, tensor: GlobalTensor, region: Region | None = None,
                reader: RangeReader | None = None) -> torch.Tensor:
    """`region` of `tensor` (whole by default) from the checkpoint folder `loc`, as a CPU tensor."""
    region = tuple(region) if region is not None else full_region(tensor)
    shape = region_shape(region)
    out = bytearray(math.prod(shape) * ITEMSIZE[tensor.dtype])
    own = reader is None
    reader = reader or RangeReader(loc)
    try:
        for piece in chunks_for(tensor, region):
            for start, end, dst in piece.ranges:
                out[dst:dst + end - start] = reader.read(piece.chunk.file, start, end)
    finally:
        if own:
            reader.close()
    if not out:
        return torch.empty(shape, dtype=TORCH_DTYPES[tensor.dtype])
    return torch.frombuffer(out, dtype=TORCH_DTYPES[tensor.dtype]).reshape(shape)

"""The safetensors container format, as data: dtypes, header parsing and header building.

A file is `u64 little-endian header length` + `JSON header` (space-padded) + raw tensor bytes.
Offsets in the header are relative to the end of the header. Nothing here touches torch, so
planners and validators can use it with plain numbers.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# safetensors dtype string → bytes per element. Sub-byte types are not handled by ckptflow.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

# A header larger than this is not a real checkpoint header (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# One range read of this size fetches the whole header of nearly every real shard.
HEADER_PROBE_BYTES = 256 * 1024


class HeaderError(UserError, ValueError):
    """The header of `file` cannot be parsed; the message says why."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a header. `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def expected_nbytes(self) -> int | None:
        size = DTYPE_SIZES.get(self.dtype)
        return None if size is None else size * self.numel


@dataclass(frozen=True)
class Header:
    """A parsed header: tensors in file order, metadata, and where the data section starts."""

    file: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def header_length(file: str, prefix: bytes, file_size: int) -> int:
    if len(prefix) < 8:
        raise HeaderError(file, f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(file, f"header length {n} is implausible (> {MAX_HEADER_BYTES} bytes); "
                                "the file is not safetensors or is corrupt")
    if 8 + n > file_size:
        raise HeaderError(file, f"header length {n} runs past the end of the file ({file_size} "
                                "bytes); the file is truncated — fetch it again")
    return n


def parse_header(file: str, raw: bytes, file_size: int) -> Header:
    """Parse `raw` (at least the first 8 + header-length bytes of the file)."""
    n = header_length(file, raw, file_size)
    if len(raw) < 8 + n:
        raise ValueError(f"{file}: need {8 + n} header bytes, got {len(raw)}")
    try:
        obj = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(file, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise HeaderError(file, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError(file, "__metadata__ is not a JSON object")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise HeaderError(file, f"tensor {name!r} has a malformed entry {entry!r} "
                                    "(needs dtype, shape, data_offsets)") from None
        if not isinstance(dtype, str) or any(d < 0 for d in shape):
            raise HeaderError(file, f"tensor {name!r} has a malformed dtype or shape: {entry!r}")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end, kv[0])))
    return Header(file, file_size, data_start, ordered, {str(k): str(v) for k, v in metadata.items()})


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know up front about one output tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in `specs` order.

    The JSON is padded with spaces to a multiple of 8 bytes, as safetensors does, so that
    every tensor's data is 8-byte aligned when the tensors are.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in obj:
            raise ValueError(f"tensor {spec.name!r} appears twice in one output shard")
        obj[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                          "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def file_size_for(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    return len(build_header(specs, metadata)) + sum(s.nbytes for s in specs)

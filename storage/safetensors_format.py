"""The safetensors container format, as data: dtypes, header parsing and header building.

A file is `u64 little-endian header length` + `JSON header` (space-padded) + raw tensor bytes.
Offsets in the header are relative to the end of the header. Nothing here touches torch, so
planners and validators can use it with plain numbers.
"""
from __future__ import annotations

import json
import math
import struct
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any

from ckptflow.storage.errors import UserError
from ckptflow.storage.strict_json import Budget, JSONRefused, gc_paused, kind, loads, lone_surrogate, short

# safetensors dtype string → bytes per element. Sub-byte types are not handled by ckptflow.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

# safetensors' own MAX_HEADER_SIZE: it refuses a header of 100_000_008 bytes, so do we.
MAX_HEADER_BYTES = 100_000_000
# One range read of this size fetches the whole header of nearly every real shard.
HEADER_PROBE_BYTES = 256 * 1024
# The `__metadata__` of every shard ckptflow writes (what transformers' save_pretrained writes).
# Planners lay out offsets with it (`ckptflow.tasks.plan.compose.planned_checkpoint`) and the
# writer writes it: the "shard is whole" size check holds only while both use this one value.
SHARD_METADATA: dict[str, str] = {"format": "pt"}
# Tensor counts no real checkpoint reaches. DeepSeek-V3 has ~91k tensors over 163 files (~560 a
# file), Kimi-K2 ~140k in all; even `--mp 1` on Kimi-K2 (one 1 TB file) holds ~140k. A tensor
# costs ~900 bytes while its header is parsed and ~350 after, so with these caps `validate`
# stays under 1 GiB whatever a header says (bench/bench_hostile_headers.py measures it).
MAX_TENSORS_PER_FILE = 200_000
MAX_TENSORS_TOTAL = 500_000
_TOO_MANY = (f"ckptflow reads at most {MAX_TENSORS_PER_FILE} tensors from one file (real checkpoints "
             "hold a few thousand per file) — the file is corrupt or hostile")
# A real entry `"name":{"dtype":"BF16","shape":[a,b],"data_offsets":[c,d]},` has one '{', four ':'
# and 7 ',' or '[' (one more per dim); the slack is for metadata strings that hold JSON.
HEADER_BUDGET = Budget(objects=MAX_TENSORS_PER_FILE + 1024, members=4 * MAX_TENSORS_PER_FILE + 65536,
                       items=12 * MAX_TENSORS_PER_FILE + 65536,
                       why=f"no header of at most {MAX_TENSORS_PER_FILE} tensors needs that many; " + _TOO_MANY)
_U64 = 2 ** 64  # safetensors reads dims and offsets as u64 and refuses any overflow
_DTYPE_NAMES = {d: d for d in DTYPE_SIZES}  # one shared str per dtype, not one per tensor


class HeaderError(UserError, ValueError):
    """The header of `file` cannot be parsed; the message says why."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True, slots=True)  # slots: a header may hold 200k of these
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
    """Parse `raw` (at least the first 8 + header-length bytes of the file), as strictly as
    safetensors does, with bounded memory: the structure is counted before anything is built."""
    n = header_length(file, raw, file_size)
    if len(raw) < 8 + n:
        raise ValueError(f"{file}: need {8 + n} header bytes, got {len(raw)}")
    return parse_header_text(file, decode_header(file, raw, n), n, file_size)


def decode_header(file: str, raw: bytes, n: int) -> str:
    """The header JSON of `raw` as text, once its byte counts show it is not too big to parse."""
    entries = raw.count(b"{", 8, 8 + n) - 1  # every tensor entry is an object: one '{' each
    if entries > HEADER_BUDGET.objects - 1:
        raise HeaderError(file, f"header has up to {entries} tensor entries (one '{{' each); {_TOO_MANY}")
    try:
        HEADER_BUDGET.check(raw, 8, 8 + n)
        return str(memoryview(raw)[8:8 + n], "utf-8")
    except JSONRefused as exc:
        raise HeaderError(file, f"header {exc}") from None
    except UnicodeDecodeError as exc:
        raise HeaderError(file, f"header is not valid JSON (not UTF-8 at byte {8 + exc.start}: "
                                f"{exc.reason})") from None


def parse_header_text(file: str, text: str, n: int, file_size: int) -> Header:
    """Parse the `n`-byte header JSON `text` (from `decode_header`) of a file of `file_size` bytes."""
    with gc_paused():
        return _parse_header_text(file, text, 8 + n, file_size)


def _parse_header_text(file: str, text: str, data_start: int, file_size: int) -> Header:
    try:
        # Without a duplicate-key hook: twice as fast. Duplicates are found by counting below.
        obj = loads(text, unique_keys=False, serde_numbers=True)
        odd = lone_surrogate(obj) if "\\u" in text else None
    except JSONRefused as exc:
        raise HeaderError(file, f"header {exc}") from None
    if odd is not None:
        raise HeaderError(file, f"header has a string with a lone UTF-16 surrogate, {short(odd)}; "
                                "it is not valid Unicode, and safetensors refuses it")
    if not isinstance(obj, dict):
        raise HeaderError(file, f"header is not a JSON object (it is {kind(obj)})")
    members = len(obj) + sum(len(v) for v in obj.values() if type(v) is dict)
    if members != text.count(":"):
        _refuse_duplicates(file, text)
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise HeaderError(file, f"__metadata__ is not a JSON object (it is {kind(metadata)})")
    bad = next(((k, v) for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise HeaderError(file, f"__metadata__ must map strings to strings; {short(bad[0])} maps to "
                                f"{kind(bad[1])}")
    if len(obj) > MAX_TENSORS_PER_FILE:
        raise HeaderError(file, f"header has {len(obj)} tensors; {_TOO_MANY}")
    tensors: list[TensorInfo] = []
    while obj:  # popping frees each parsed entry as soon as its TensorInfo exists
        name, entry = obj.popitem()
        tensors.append(_tensor(file, name, entry, data_start))
    tensors.sort(key=_FILE_ORDER)
    return Header(file, file_size, data_start, {t.name: t for t in tensors}, metadata)


_FILE_ORDER = attrgetter("start", "end", "name")


def _refuse_duplicates(file: str, text: str) -> None:
    """Parse again with a hook that refuses a repeated key.

    Only when the cheap test fails: every object member has one ':' outside strings, so when
    the parsed objects hold as many members as the text has colons, no key was repeated. Colons
    in names or metadata, or objects nested in fields safetensors ignores, land here too.
    """
    try:
        loads(text, unique_keys=True, serde_numbers=True)
    except JSONRefused as exc:
        raise HeaderError(file, f"header {exc}") from None


def _tensor(file: str, name: str, entry: Any, data_start: int) -> TensorInfo:
    """One header entry, checked as serde_json checks it against safetensors' `TensorInfo`.

    Written as plain loops (no generators, no closures): it runs once per tensor, 200k times
    for a big header.
    """
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, IndexError):
        raise _malformed(file, name, entry, "needs dtype, shape, data_offsets") from None
    if type(dtype) is not str:
        raise _malformed(file, name, entry, f"dtype must be a string, got {kind(dtype)}")
    if type(shape) is not list:
        raise _malformed(file, name, entry, f"shape must be a list, got {kind(shape)}")
    numel = 1
    for i, d in enumerate(shape):  # in order, as safetensors multiplies: [2**63, 4, 0] overflows
        if type(d) is not int or d < 0 or d >= _U64:
            raise _malformed(file, name, entry, f"dim {i} is {short(d, 40)} ({kind(d)}); dims are "
                                                "integers from 0 to 2**64 - 1")
        numel *= d
        if numel >= _U64:
            raise _malformed(file, name, entry, "its shape has 2**64 elements or more")
    if type(offsets) is not list or len(offsets) != 2:
        raise _malformed(file, name, entry, "data_offsets must be two integers from 0 to 2**64 - 1")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not (0 <= begin < _U64 and 0 <= end < _U64):
        raise _malformed(file, name, entry, "data_offsets must be two integers from 0 to 2**64 - 1")
    size = DTYPE_SIZES.get(dtype)
    if size is not None and numel * size * 8 >= _U64:
        raise _malformed(file, name, entry, f"{dtype} × its shape is 2**64 bits or more")
    return TensorInfo(name, _DTYPE_NAMES.get(dtype, dtype), tuple(shape), data_start + begin, data_start + end)


def _malformed(file: str, name: str, entry: Any, why: str) -> HeaderError:
    return HeaderError(file, f"tensor {short(name, 120)} has a malformed entry {short(entry)} ({why})")


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

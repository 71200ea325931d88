"""A torch_dist `.metadata` pickle, read through stub classes: no torch.distributed, no code runs.

The file is a pickle of a few plain dataclasses (`Metadata`, `TensorStorageMetadata`, ...). A
`pickle.Unpickler` whose `find_class` answers with small stand-ins of our own for exactly those
names, and refuses every other global by name, reads it without importing the classes it names.
Nothing is trusted after loading either: every field is type-checked while converting to plain
data (`DcpMetadata`), every integer bounded, and the total number of chunks capped before any
loop walks them (memo references can make one chunk list appear a million times).
"""
from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from typing import Any

from ckptflow.tasks.megatron.safe import MegatronLoadError, human

# DeepSeek-V3 saved at TP×PP×EP = 8×4×8 with its optimizer state has ~4·10^5 chunks, ~60 MB of
# pickle; an unpickled chunk costs ~0.5 KB. Past these the file is not a real checkpoint's.
METADATA_CAP = 256 << 20
MAX_CHUNKS = 1 << 22
SET_BUDGET = 1 << 30
MAX_DIMS = 8
MAX_INT = 1 << 62  # every size, offset and length; their products are checked against it too

# safetensors dtype names of the torch dtypes a checkpoint may hold.
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
          "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _Stub:
    """A pickled dataclass instance: pickle's own BUILD fills its __dict__ (in C: no Python call
    per object, which matters at 10^5 chunks); nothing else, nothing runs."""


class _TupleStub(_Stub):
    """TensorProperties pickles a tuple (its own __getstate__)."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _stub(name: str, base: type = _Stub) -> type:
    return type(name, (base,), {})


@dataclass(frozen=True)
class _Dtype:
    name: str  # torch.<name>


class _RawShape(tuple):
    """A torch.Size as the pickle built it: values not checked yet."""

    __slots__ = ()


def _size(values: Any) -> tuple[int, ...]:
    """A torch.Size's values, checked: a few non-negative integers."""
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise ValueError("torch.Size of something other than a few non-negative integers")
    for v in values:
        if type(v) is not int or not 0 <= v < MAX_INT:
            raise ValueError("torch.Size of something other than a few non-negative integers")
    return tuple(values)


def _layout(name: Any) -> str:  # torch.serialization._get_layout("torch.strided")
    if name != "torch.strided":
        raise ValueError(f"tensor layout {str(name)[:40]!r}; Megatron saves dense (strided) tensors")
    return name


def _mem_format(value: Any) -> int:  # _MEM_FORMAT_ENCODING(n): an enum, kept as its value
    if type(value) is not int:
        raise ValueError("memory format")
    return value


def _path(*parts: Any) -> str:  # pathlib.PosixPath(*parts) in StorageMeta.checkpoint_id
    if not all(type(p) is str for p in parts) or sum(map(len, parts)) > 4096:
        raise ValueError("checkpoint path")
    return "/".join(parts)


_DCP = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"


def _classes() -> dict[tuple[str, str], Any]:
    """What each allowed global stands for: fresh classes and values for every file, because
    pickle's BUILD can set attributes on whatever a GLOBAL pushed (a class, a dtype value), and a
    hostile file must not change how the next file is read."""
    return {
        **{(_DCP, n): _stub(n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                           "BytesStorageMetadata", "MetadataIndex", "StorageMeta")},
        (_DCP, "TensorProperties"): _stub("TensorProperties", _TupleStub),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _stub("_StorageInfo"),
        (_DCP, "_MEM_FORMAT_ENCODING"): _mem_format,
        # Megatron caches each rank's save plan in the metadata (`all_local_plans`); read, never used.
        **{(_PLANNER, n): _stub(n) for n in ("SavePlan", "WriteItem", "TensorWriteData")},
        (_PLANNER, "WriteItemType"): _mem_format,  # an enum: kept as its value
        ("torch", "Size"): type("Size", (_RawShape,), {"__slots__": ()}),  # built in C; checked at use
        ("torch.serialization", "_get_layout"): _layout,
        ("pathlib", "PosixPath"): _path,
        ("pathlib", "PurePosixPath"): _path,
        **{("torch", n): _Dtype(n) for n in DTYPES},
    }


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(io.BytesIO(data))
        self.label = label
        self.classes = _classes()

    def find_class(self, module: str, name: str) -> Any:
        found = self.classes.get((module, name))
        if found is None:
            raise MegatronLoadError(
                f"{self.label}: refused: its pickle asks for {module}.{name}, which is not one of the "
                "classes a torch_dist .metadata holds (DCP metadata dataclasses, torch.Size, dtypes). "
                "Nothing from it was run.")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in .metadata")


@dataclass(frozen=True)
class DcpChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str         # relative path of the .distcp file
    item_offset: int  # where the chunk's torch.save archive starts in that file
    item_length: int


@dataclass(frozen=True)
class DcpTensor:
    key: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpMetadata:
    tensors: dict[str, DcpTensor]   # model tensors only: optimizer and RNG state are left out
    skipped: int                    # how many entries were left out
    mcore_data: dict[str, Any]      # Megatron's extra per-key data, when it saved any (plain values)


def _fields(obj: Any, cls: str, label: str) -> dict[str, Any]:
    if type(obj).__name__ != cls or not isinstance(obj, _Stub):
        raise ValueError(f"expected a {cls}, found a {type(obj).__name__}")
    if isinstance(obj, _TupleStub):
        state = obj.__dict__.get("state")
        if not isinstance(state, (dict, tuple)):
            raise ValueError(f"a {cls} without its fields")
        return state  # type: ignore[return-value]
    return obj.__dict__


def skipped_key(key: str) -> bool:
    """Optimizer and RNG state, modules' `_extra_state` (TransformerEngine's FP8 metadata, saved as
    bytes or a uint8 tensor): never part of a model conversion, never read."""
    return key.startswith(("optimizer.", "optimizer/", "rng_state", "rerun_state_machine")) \
        or "._extra_state" in key


def parse_metadata(data: bytes, label: str) -> DcpMetadata:
    """The model tensors `.metadata` (`data`) describes; a MegatronLoadError names `label` otherwise."""
    if len(data) > METADATA_CAP:
        raise MegatronLoadError(f"{label}: {human(len(data))}, larger than any real checkpoint's .metadata "
                                f"({human(METADATA_CAP)} accepted): refused")
    # The C unpickler builds what the opcodes say; most cost at most ~50 bytes of memory per byte of
    # file, but an empty set costs 216 for one byte (EMPTY_SET, FROZENSET; .metadata holds none).
    # Counting those byte values over-counts (they also occur inside integers and strings), so
    # this bound errs on the safe side, in microseconds.
    sets = data.count(b"\x8f") + data.count(b"\x91")
    if sets * 216 > SET_BUDGET:
        raise MegatronLoadError(f"{label}: refused: it could build up to {sets} Python sets "
                                f"({human(sets * 216)}); a torch_dist .metadata holds none")
    try:
        root = _Unpickler(data, label).load()
        return _convert(root, label)
    except MegatronLoadError:
        raise
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError,
            OverflowError, RecursionError, MemoryError, UnicodeDecodeError) as exc:
        raise MegatronLoadError(f"{label}: not a readable torch_dist .metadata (truncated or corrupt?): "
                                f"{str(exc)[:200] or type(exc).__name__}") from None


def _convert(root: Any, label: str) -> DcpMetadata:  # noqa: C901 - one check per field
    meta = _fields(root, "Metadata", label)
    if not isinstance(meta, dict) or not isinstance(meta.get("state_dict_metadata"), dict):
        raise ValueError("Metadata without state_dict_metadata")
    storage = meta.get("storage_data")
    if not isinstance(storage, dict):
        raise ValueError("Metadata without storage_data (not written by a FileSystemWriter?)")
    entries = meta["state_dict_metadata"]
    wanted = {k: v for k, v in entries.items() if type(k) is str and not skipped_key(k)}
    if len(wanted) != sum(1 for k in entries if type(k) is str and not skipped_key(k)) or \
            any(type(k) is not str for k in entries):
        raise ValueError("a non-string key")
    total = 0
    for key, entry in wanted.items():  # count before walking: shared lists make counts explode
        if type(entry).__name__ == "TensorStorageMetadata":
            chunks = _fields(entry, "TensorStorageMetadata", label).get("chunks")
            total += len(chunks) if isinstance(chunks, list) else 0
    if total > MAX_CHUNKS:
        raise MegatronLoadError(f"{label}: describes {total} chunks of model tensors; a real checkpoint has "
                                f"far fewer ({MAX_CHUNKS} accepted): refused")
    places = _storage_places(storage, set(wanted), label)
    tensors: dict[str, DcpTensor] = {}
    for key, entry in wanted.items():
        if type(entry).__name__ == "BytesStorageMetadata":
            continue  # pickled objects (Megatron's non-tensor state): not weights
        tensors[key] = _tensor(key, _fields(entry, "TensorStorageMetadata", label), places, label)
    mcore = meta.get("mcore_data")
    return DcpMetadata(tensors, len(entries) - len(tensors), mcore if isinstance(mcore, dict) else {})


def _storage_places(storage: dict, keys: set[str], label: str) -> dict[tuple[str, tuple[int, ...]], tuple]:
    out = {}
    for index, info in storage.items():
        idx = _fields(index, "MetadataIndex", label)
        fqn = idx.get("fqn")
        if fqn not in keys:
            continue
        offset = idx.get("offset")
        where = _fields(info, "_StorageInfo", label)
        path, start, length = where.get("relative_path"), where.get("offset"), where.get("length")
        if type(path) is not str or not path or "/" in path or path.startswith(".") or \
                not all(type(v) is int and 0 <= v < MAX_INT for v in (start, length)):
            raise MegatronLoadError(f"{label}: tensor {fqn!r}: storage entry with file {str(path)[:80]!r}, offset "
                                    f"{start!r}, length {length!r}: not a file of this folder and a byte "
                                    "range; refused")
        if where.get("transform_descriptors"):
            raise MegatronLoadError(f"{label}: tensor {fqn!r} is stored with transforms "
                                    f"{list(where['transform_descriptors'])[:4]} (compressed?); only plain "
                                    "torch_dist checkpoints can be read by range: save without them")
        out[(fqn, _size(offset) if offset is not None else ())] = (path, start, length)
    return out


def _tensor(key: str, fields: dict, places: dict, label: str) -> DcpTensor:
    props = _fields(fields.get("properties"), "TensorProperties", label)
    dtype = props[0] if isinstance(props, tuple) else props.get("dtype")
    if not isinstance(dtype, _Dtype):
        raise ValueError(f"tensor {key!r}: no dtype")
    shape = _size(fields.get("size"))
    if math.prod(shape) * ITEMSIZE[DTYPES[dtype.name]] >= MAX_INT:
        raise MegatronLoadError(f"{label}: tensor {key!r} claims shape {list(shape)}: past any real "
                                "tensor; refused")
    chunks = []
    for c in fields.get("chunks") or ():
        cf = _fields(c, "ChunkStorageMetadata", label)
        offsets, sizes = _size(cf.get("offsets")), _size(cf.get("sizes"))
        place = places.get((key, offsets))
        if place is None:
            raise MegatronLoadError(f"{label}: tensor {key!r}: chunk at {list(offsets)} has no storage "
                                    "entry (no file, offset, length); the checkpoint is incomplete")
        chunks.append(DcpChunk(tuple(offsets), tuple(sizes), *place))
    return DcpTensor(key, DTYPES[dtype.name], tuple(shape), tuple(chunks))

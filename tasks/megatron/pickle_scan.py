"""Read a torch.save pickle without building it, to bound what loading it would allocate.

`torch.load(weights_only=True)` runs no code from the file, yet what it does run can be told by a
file of a few KB to allocate without limit: `bytearray(3_000_000_000)` is on its allowlist, numpy's
`_reconstruct` (needed for RNG states) takes any shape, one 4-byte storage can back a tensor of 750M
elements (stride 0: `expand` saves that way) that the conversion's `.contiguous()` then copies, and
a legacy-format file states each storage's size before its bytes follow. So before torch sees a
file, `scan_pickle` interprets its pickle with the opcodes torch's weights-only unpickler knows,
building nothing big: tensors become meta tensors (shape, stride, dtype, no memory), storages
become claims checked against the bytes the file really holds. The meta tree it returns lets the
conversion check every shape before one tensor byte is read.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import math
import struct
from argparse import Namespace
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pickle import decode_long
from typing import Any

import numpy as np
import torch

from ckptflow.tasks.megatron.safe import (NUMPY_DTYPES, MegatronEnum, MegatronLoadError, bytearray_size, enum_classes,
                           human, numpy_dtype, numpy_nbytes, unsafe_global, view_problem)

# A Megatron GPT-2 345M model_optim_rng.pt pickle (args, ~1200 tensors, RNG) is ~200 KB; tensor
# bytes are elsewhere. 16 MiB of pickle unpickles to at most ~0.5 GB of Python objects.
PICKLE_CAP = 16 << 20
MAX_DIMS = 8
# A Megatron rank file holds a few thousand tensors (params + optimizer states); memo references
# let each further one cost a pickle ~15 bytes, so their number is capped, not just the bytes.
MAX_TENSORS = 1 << 17
_ENCODINGS = ("latin1", "latin-1", "utf-8", "utf8", "ascii")  # what pickle protocol 2 uses for bytes


@dataclass(frozen=True)
class _Global:
    name: str  # a name the pickle GLOBALs: a value until REDUCE / NEWOBJ gives it meaning


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype  # torch.FloatStorage & co. name a dtype and nothing else


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int  # in elements of dtype, as the pickle claims


class _Refused:
    """Stands in for a tensor the scan refused; the error names it once its path in the tree is known."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _NdArray:
    """A numpy array being rebuilt; BUILD's state says its shape and dtype."""


class _Corrupt(Exception):
    """Malformed pickle: reported as a corrupt file."""


_REBUILDS = {"torch._utils._rebuild_tensor": 4, "torch._utils._rebuild_tensor_v2": 6,
             "torch._utils._rebuild_tensor_v3": 7}
_PARAMETERS = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_SMALL_CALLS: dict[str, Any] = {  # harmless on inputs as big as the pickle itself
    "collections.OrderedDict": OrderedDict, "collections.Counter": Counter, "builtins.set": set,
    "builtins.complex": complex, "torch.Size": torch.Size, "torch.device": torch.device,
    "torch.serialization._get_layout": torch.serialization._get_layout}
_VALUES = {"numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter", "argparse.Namespace",
           "torch._tensor._rebuild_from_type_v2", "_codecs.encode", "builtins.bytearray", "numpy.dtype",
           *_REBUILDS, *_PARAMETERS, *_SMALL_CALLS,
           *(f"{m}.{n}" for m in _NUMPY_MODULES for n in ("_reconstruct", "scalar")),
           *(f"numpy.dtypes.{n}" for n in NUMPY_DTYPES)}


_TORCH_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


def _storage_dtype(module: str, name: str) -> torch.dtype | None:
    if name == "UntypedStorage" and module in ("torch", "torch.storage"):
        return torch.uint8
    if module in ("torch", "torch.cuda") and name.endswith("Storage"):  # old GPU saves name torch.cuda
        try:
            return torch.serialization.StorageType(name).dtype  # torch's own name → dtype table
        except KeyError:
            return None
    return None


def _ints(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(type(x) is int and x >= 0 for x in v)


class _Scan:
    """One pickle, interpreted the way torch's weights-only unpickler would, minus the allocations."""

    def __init__(self, data: bytes, label: str, cut: bool) -> None:
        self.data, self.label, self.cut, self.pos = data, label, cut, 0
        self.storages: dict[str, tuple[torch.dtype, int]] = {}
        # id(meta tensor) → (storage key, offset in elements): where its bytes are, for readers that
        # locate tensors by range instead of loading them (tasks/mcore/legacy.py).
        self.sources: dict[int, tuple[str, int]] = {}
        self.refused: list[_Refused] = []
        # What calls copy (encode, bytearray, set(...), BUILD's dict update) from memo references
        # that cost 2 bytes each: a real pickle copies each of its values once, so no more than it holds.
        self.budget, self.tensors = len(data) + (1 << 20), 0

    def spend(self, value: Any) -> Any:
        self.budget -= len(value) if hasattr(value, "__len__") else 1
        if self.budget < 0:
            raise MegatronLoadError(f"{self.label}: refused: its pickle copies the same values over and over, "
                                    f"past its own size ({human(len(self.data))}); Megatron-LM's never does")
        return value

    def read(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            if self.cut:
                raise MegatronLoadError(f"{self.label}: its pickle is larger than {human(PICKLE_CAP)}; "
                                        "a Megatron-LM checkpoint's is well under that: refused")
            raise _Corrupt("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            raise _Corrupt("unterminated GLOBAL")
        out, self.pos = self.data[self.pos:end].decode("utf-8"), end + 1
        return out

    def load(self) -> Any:  # noqa: C901 - one opcode per branch, as pickle's own loop
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        while True:
            op = self.read(1)[0]
            if op == 0x80:                                   # PROTO
                self.read(1)
            elif op == 0x2E:                                 # STOP
                return stack.pop()
            elif op == 0x63:                                 # GLOBAL
                stack.append(self.global_(self.line(), self.line()))
            elif op == 0x52:                                 # REDUCE
                args = stack.pop()
                stack[-1] = self.call(stack[-1], args)
            elif op == 0x81:                                 # NEWOBJ
                args = stack.pop()
                stack[-1] = self.new(stack[-1], args)
            elif op == 0x62:                                 # BUILD
                state = stack.pop()
                self.build(stack[-1], state)
            elif op == 0x51:                                 # BINPERSID
                stack.append(self.storage(stack.pop()))
            elif op == 0x28:                                 # MARK
                marks.append(stack)
                stack = []
            elif op in (0x74, 0x65, 0x75):                   # TUPLE, APPENDS, SETITEMS
                items, stack = stack, marks.pop()
                if op == 0x74:
                    stack.append(tuple(items))
                elif op == 0x65:
                    if type(stack[-1]) is not list:
                        raise _Corrupt("APPENDS to a non-list")
                    stack[-1].extend(items)
                else:
                    target = self.mapping(stack[-1])
                    for i in range(0, len(items), 2):
                        target[items[i]] = items[i + 1]
            elif op == 0x61:                                 # APPEND
                item = stack.pop()
                if type(stack[-1]) is not list:
                    raise _Corrupt("APPEND to a non-list")
                stack[-1].append(item)
            elif op == 0x73:                                 # SETITEM
                value, key = stack.pop(), stack.pop()
                self.mapping(stack[-1])[key] = value
            elif op in (0x85, 0x86, 0x87):                   # TUPLE1..3
                n = op - 0x84
                if len(stack) < n:
                    raise _Corrupt("TUPLE of too few items")
                stack[-n:] = [tuple(stack[-n:])]
            elif op in (0x4E, 0x88, 0x89):                   # NONE, NEWTRUE, NEWFALSE
                stack.append({0x4E: None, 0x88: True, 0x89: False}[op])
            elif op in (0x29, 0x5D, 0x7D, 0x8F):             # EMPTY_TUPLE / LIST / DICT / SET
                stack.append({0x29: tuple, 0x5D: list, 0x7D: dict, 0x8F: set}[op]())
            elif op == 0x4A:                                 # BININT
                stack.append(struct.unpack("<i", self.read(4))[0])
            elif op == 0x4B:                                 # BININT1
                stack.append(self.read(1)[0])
            elif op == 0x4D:                                 # BININT2
                stack.append(struct.unpack("<H", self.read(2))[0])
            elif op == 0x8A:                                 # LONG1
                stack.append(decode_long(self.read(self.read(1)[0])))
            elif op == 0x47:                                 # BINFLOAT
                stack.append(struct.unpack(">d", self.read(8))[0])
            elif op == 0x58:                                 # BINUNICODE
                n = struct.unpack("<I", self.read(4))[0]
                stack.append(str(self.read(n), "utf-8", "surrogatepass"))
            elif op == 0x55:                                 # SHORT_BINSTRING (torch.load: utf-8)
                stack.append(self.read(self.read(1)[0]).decode("utf-8"))
            elif op in (0x68, 0x6A):                         # BINGET, LONG_BINGET
                idx = self.read(1)[0] if op == 0x68 else struct.unpack("<I", self.read(4))[0]
                stack.append(memo[idx])
            elif op in (0x71, 0x72):                         # BINPUT, LONG_BINPUT
                idx = self.read(1)[0] if op == 0x71 else struct.unpack("<I", self.read(4))[0]
                memo[idx] = stack[-1]
            else:
                raise _Corrupt(f"opcode {op:#04x}, which torch's weights-only loader does not accept")

    def mapping(self, obj: Any) -> dict:
        if type(obj) not in (dict, OrderedDict, Counter):
            raise _Corrupt("SETITEM on a non-dict")
        return obj

    def global_(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as torch maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if (dtype := _storage_dtype(module, name)) is not None:
            return _StorageType(dtype)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if full in _VALUES or full in enum_classes():
            return _Global(full)
        raise unsafe_global(self.label, full)

    def call(self, func: Any, args: Any) -> Any:  # noqa: C901 - one allowlisted callable per branch
        if not isinstance(func, _Global) or type(args) is not tuple:
            raise _Corrupt("REDUCE of something not callable")
        name = func.name
        if name in _REBUILDS:
            return self.tensor(name, args)
        if name in _PARAMETERS:
            if not isinstance(args[0], (torch.Tensor, _Refused)):
                raise _Corrupt(name)
            return args[0]
        if name == "torch._tensor._rebuild_from_type_v2":  # (rebuild, Tensor or Parameter, args, state)
            fn, new_type, inner, _ = args
            if getattr(new_type, "name", None) not in ("torch.Tensor", "torch.nn.parameter.Parameter") \
                    or getattr(fn, "name", None) not in _REBUILDS:
                raise _Corrupt("a tensor subclass")
            return self.tensor(fn.name, inner)
        if name == "builtins.bytearray":  # from bytes or a str in the file, or a count: checked
            return self.spend(bytearray(*args) if not (args and type(args[0]) is int) else
                              bytearray(bytearray_size(self.label, args[0])))
        if name == "_codecs.encode":
            if not (isinstance(args[0], str) and (len(args) == 1 or args[1] in _ENCODINGS)):
                raise _Corrupt("_codecs.encode with an unusual encoding")
            return self.spend(codecs.encode(args[0], *args[1:2]))
        if name.endswith("._reconstruct"):  # numpy: (ndarray, shape, dtype); numpy.save's is ((0,), 'b')
            cls, shape, code = args
            if getattr(cls, "name", None) != "numpy.ndarray":
                raise _Corrupt("numpy _reconstruct of a non-array")
            numpy_nbytes(self.label, shape, numpy_dtype(code))
            return _NdArray()
        if name.endswith(".scalar"):  # numpy scalar: (dtype, its bytes)
            dtype, raw = args
            if not isinstance(raw, bytes) or len(raw) != numpy_nbytes(self.label, (), numpy_dtype(dtype)):
                raise _Corrupt("numpy scalar")
            return np.frombuffer(raw, dtype)[0]
        if name == "numpy.dtype" or name.startswith("numpy.dtypes."):  # (code, align, copy)
            return numpy_dtype(args[0] if isinstance(args[0], str) else None)
        if name in _SMALL_CALLS:
            return self.spend(_SMALL_CALLS[name](*args))
        if name in enum_classes():
            return enum_classes()[name](*args)
        raise MegatronLoadError(f"{self.label}: refused: its pickle calls {name}{human_args(args)}, "
                                "which Megatron-LM checkpoints never do")

    def new(self, cls: Any, args: Any) -> Any:
        name = getattr(cls, "name", None)
        if name == "argparse.Namespace" and args == ():
            return Namespace()
        if name == "torch.nn.parameter.Parameter" and isinstance(args, tuple) and args \
                and isinstance(args[0], (torch.Tensor, _Refused)):
            return args[0]
        raise MegatronLoadError(f"{self.label}: refused: its pickle constructs {name or cls!r}, which "
                                "Megatron-LM checkpoints never do")

    def build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, Namespace) and isinstance(state, dict):
            vars(inst).update({k: v for k, v in self.spend(state).items() if isinstance(k, str)})
        elif isinstance(inst, np.dtype):  # (version, byte order, subarray, names, fields, ...)
            if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
                raise MegatronLoadError(f"{self.label}: refused: its pickle builds a structured numpy "
                                        "dtype; Megatron-LM's RNG states use plain ones")
        elif isinstance(inst, _NdArray):  # ([version,] shape, dtype, is_fortran, raw bytes)
            state = state[1:] if isinstance(state, tuple) and len(state) == 5 else state
            if not isinstance(state, tuple) or len(state) != 4:
                raise _Corrupt("numpy array state")
            shape, dtype, _, raw = state
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != numpy_nbytes(self.label, shape,
                                                                                    numpy_dtype(dtype)):
                raise _Corrupt("numpy array data")
        elif not isinstance(inst, (OrderedDict, MegatronEnum, _Refused)):
            raise _Corrupt(f"BUILD of a {type(inst).__name__}")

    def storage(self, pid: Any) -> _Storage:
        """('storage', type, key, location, numel[, legacy view]) → a claim, checked after the scan."""
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise _Corrupt("persistent id")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
            raise _Corrupt("storage id")
        if self.storages.setdefault(key, (stype.dtype, numel)) != (stype.dtype, numel):
            raise _Corrupt(f"storage {key} claimed twice with different sizes or dtypes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _Storage(key, stype.dtype, numel)
        view_key, offset, size = view  # legacy format: a slice of the root storage
        if not _ints((offset, size)) or offset + size > numel:
            raise _Corrupt("storage view outside its storage")
        return _Storage(f"{key}[{offset}:{offset + size}]", stype.dtype, size)

    def tensor(self, name: str, args: tuple) -> torch.Tensor | _Refused:
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise MegatronLoadError(f"{self.label}: refused: its pickle rebuilds more than {MAX_TENSORS} "
                                    "tensors; a Megatron-LM rank file holds a few thousand")
        if len(args) < _REBUILDS[name]:
            raise _Corrupt(name)
        storage, offset, size, stride = args[:4]
        dtype = args[6] if name.endswith("_v3") else getattr(storage, "dtype", None)
        if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0 or not _ints(size) \
                or not _ints(stride) or len(size) != len(stride) or len(size) > MAX_DIMS \
                or not isinstance(dtype, torch.dtype):
            raise _Corrupt(f"{name} arguments")
        have = storage.numel * storage.dtype.itemsize // dtype.itemsize  # elements of dtype
        problem = view_problem(tuple(size), tuple(stride), offset, have)
        if problem is None:
            meta = torch.empty_strided(size, stride, dtype=dtype, device="meta")
            self.sources[id(meta)] = (storage.key, offset)
            return meta
        refused = _Refused(f"has shape {list(size)} and strides {list(stride)} over a storage of {have} "
                           f"element(s) ({problem}): it stands for {human(math.prod(size) * dtype.itemsize)} "
                           f"from {human(have * dtype.itemsize)} of file. Megatron-LM saves whole tensors")
        self.refused.append(refused)
        return refused


def human_args(args: tuple) -> str:
    text = repr(args)
    return text if len(text) <= 60 else text[:57] + "...)"


def _path_of(tree: Any, target: _Refused) -> str | None:
    """Where `target` sits in the loaded tree (e.g. model.language_model.encoder.x.weight)."""
    seen: set[int] = set()
    todo: list[tuple[Any, str]] = [(tree, "")]
    while todo:
        obj, path = todo.pop()
        if obj is target:
            return path or "(the whole file)"
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Namespace):
            obj = vars(obj)
        if isinstance(obj, dict):
            todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
    return None


def scan_pickle(data: bytes, label: str, cut: bool = False, start: int = 0) -> tuple[Any, _Scan]:
    """Interpret one pickle of `data` from `start`; (its meta tree, the scan: storages, end)."""
    scan = _Scan(data, label, cut)
    scan.pos = start
    try:
        tree = scan.load()
    except MegatronLoadError:
        raise
    except (_Corrupt, IndexError, KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError,
            RuntimeError, OverflowError) as exc:
        raise MegatronLoadError(f"{label}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                                f"its pickle fails at byte {scan.pos}: {exc or type(exc).__name__}") from None
    for refused in scan.refused:
        where = _path_of(tree, refused)
        raise MegatronLoadError(f"{label}: tensor {where or '(not in the checkpoint tree)'} {refused.reason}; "
                                "refused before loading")
    return tree, scan

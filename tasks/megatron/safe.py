"""What a Megatron-LM pickle may hold besides tensors, and the errors loading one raises.

One allowlist serves both readers: `megatron_pickle`'s bounded scan (by name) and
`torch.load(weights_only=True)` (by object, through `safe_globals()`).
"""
from __future__ import annotations

import functools
import math
import re
from argparse import Namespace
from typing import Any

import numpy as np

from ckptflow.storage.errors import UserError

BYTES_CAP = 1 << 20   # bytearray(n): Megatron pickles none; torch's allowlist has it for bytearrays
NUMPY_CAP = 1 << 20   # numpy arrays: the RNG state (624 uint32, 2.5 KB) is all Megatron pickles
_DTYPE_CODE = re.compile(r"[<>=|]?[a-zA-Z]{1,2}\d{0,3}")  # 'u4', '<f8', 'b': no structured dtypes


class MegatronLoadError(UserError):
    """The location holds no loadable Megatron-LM checkpoint; the message names the file."""


class UnsafeCheckpointError(MegatronLoadError):
    """The pickle asked for a global outside the allowlist; nothing from it was run."""


def human(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB" if n >= 10**5 else f"{n} bytes"


def unsafe_global(label: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{label}: refused: its pickle asks for {name}, which is not on the allowlist of what "
        "Megatron-LM checkpoints hold (tensors, argparse.Namespace, numpy RNG state). Nothing "
        "from it was run. Only if you trust the file, re-save it without that object.")


class MegatronEnum:
    """Stand-in for a Megatron enum in `args` (ModelType, AttnBackend): keeps the value only.

    Recent Megatron pickles `args.model_type` / `args.attention_backend` as its own enum classes;
    mapping their names to this class lets such checkpoints load without importing Megatron and
    without running anything from the file (an enum unpickles as `Class(value)`).
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({self.value!r})"


_MEGATRON_ENUMS = ("megatron.core.enums.ModelType", "megatron.model.enums.ModelType",
                   "megatron.core.transformer.enums.AttnBackend")
# numpy dtype classes a saved RNG state / numpy scalar may name (numpy >= 1.25 BUILDs them).
NUMPY_DTYPES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                 "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType",
                 "Float64DType", "LongDType", "ULongDType", "LongLongDType", "ULongLongDType")


@functools.cache
def enum_classes() -> dict[str, type[MegatronEnum]]:
    """Pickled Megatron enum name → a MegatronEnum subclass of that name."""
    out = {}
    for name in _MEGATRON_ENUMS:
        module, cls = name.rsplit(".", 1)
        out[name] = type(cls, (MegatronEnum,), {"__module__": module})
    return out


def safe_globals() -> list[Any]:
    """The allowlist beyond torch's own (tensors, torch dtypes, OrderedDict, _codecs.encode...)."""
    return list(_safe_globals())


@functools.cache
def _safe_globals() -> tuple[Any, ...]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [Namespace, np.ndarray, np.dtype]  # args; np.random.get_state() arrays
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files from numpy 1.x and 2.x
        allowed += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    allowed += [getattr(dtypes, n) for n in NUMPY_DTYPES if dtypes is not None and hasattr(dtypes, n)]
    allowed += [(cls, name) for name, cls in enum_classes().items()]
    return tuple(allowed)


# What a pickle may ask for by count rather than by bytes it holds. A ValueError means malformed.

def bytearray_size(label: str, n: int) -> int:
    if n > BYTES_CAP:
        raise MegatronLoadError(f"{label}: refused: its pickle asks for bytearray({n}), {human(n)} of zeros "
                                "from a few bytes of file; Megatron-LM checkpoints hold no such buffer")
    return n


def numpy_dtype(value: Any) -> np.dtype:
    """A dtype as a pickle names it: a plain code ('u4', b'b') or a dtype already built."""
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if isinstance(value, str):
        if not _DTYPE_CODE.fullmatch(value):
            raise ValueError(f"numpy dtype {value!r}")
        value = np.dtype(value)
    if not isinstance(value, np.dtype):
        raise ValueError("not a numpy dtype")
    return value


def numpy_nbytes(label: str, shape: Any, dtype: np.dtype) -> int:
    """The bytes of a numpy array of `shape` and `dtype`, refused past NUMPY_CAP or holding objects."""
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("numpy shape")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > NUMPY_CAP:
        raise MegatronLoadError(f"{label}: refused: its pickle builds a numpy array of shape {list(shape)} "
                                f"({human(nbytes)}); the only numpy arrays in Megatron-LM checkpoints are "
                                f"RNG states (624 numbers; at most {human(NUMPY_CAP)} is accepted)")
    if dtype.hasobject:
        raise MegatronLoadError(f"{label}: refused: its pickle asks for a numpy array of Python objects "
                                "(dtype 'O'); Megatron-LM checkpoints hold numbers only")
    return nbytes


def view_problem(size: tuple[int, ...], stride: tuple[int, ...], offset: int, have: int) -> str | None:
    """Why a tensor of `size`/`stride` at `offset` may not sit on a storage of `have` elements, if so.

    Megatron saves whole tensors (or slices of one): no element twice, all inside the storage. An
    expanded (stride-0) or overlapping view would turn a few bytes into gigabytes once copied."""
    if not math.prod(size):
        return None
    dims = sorted((st, n) for n, st in zip(size, stride) if n > 1)
    dense = 1
    for st, n in dims:  # each stride steps past the block the smaller ones span
        if st < dense:
            return "an expanded or overlapping view"
        dense = st * n
    if offset + 1 + sum((n - 1) * st for st, n in dims) > have:
        return "a view reaching past its storage"
    return None

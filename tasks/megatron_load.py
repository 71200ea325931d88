"""Find and safely load a Megatron-LM checkpoint (torch format) from any fsspec location.

Accepted shapes, as Megatron-LM and NVIDIA ship them:
  * one `.pt` file (`torch.save` output, zip or pre-1.6 legacy format);
  * a checkpoint directory: `latest_checkpointed_iteration.txt` holds "release" or an iteration
    number and picks `release/` or `iter_0000NNN/`, which holds `mp_rank_XX/model_optim_rng.pt`,
    one per tensor-parallel rank (all ranks are returned, in rank order);
  * a `.zip` holding such a tree (NVIDIA's `megatron_lm_345m_v0.0.zip`) or a single `.pt`.

Pickles are never trusted: `torch.load(weights_only=True)` with an explicit allowlist of what real
Megatron checkpoints hold besides tensors. Anything else is refused before it can run, with the
global it asked for named in the error.
"""
from __future__ import annotations

import functools
import io
import posixpath
import re
import zipfile
from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pickle import UnpicklingError
from typing import IO, Any, NoReturn

import numpy as np
import torch

from storage.errors import UserError
from storage.files import list_files
from storage.urls import open_location

TRACKER = "latest_checkpointed_iteration.txt"
# Only these top-level entries are kept: optimizer and RNG states can be 3x the model's size.
KEEP = ("model", "args", "checkpoint_version", "iteration")
_RANK_RE = re.compile(r"^(?P<dir>(?:.*/)?)mp_rank_(?P<tp>\d{2})(?:_(?P<pp>\d{3}))?/model_optim_rng\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


class MegatronLoadError(UserError):
    """The location holds no loadable Megatron-LM checkpoint; the message names the file."""


class UnsafeCheckpointError(MegatronLoadError):
    """The pickle asked for a global outside the allowlist; nothing from it was run."""


@dataclass
class MegatronCheckpoint:
    ranks: list[dict[str, Any]]   # per tensor-parallel rank, rank order; only the KEEP entries
    args: Namespace | dict | None  # Megatron's training arguments (rank 0); None in old releases
    checkpoint_version: float     # 0.0 when the checkpoint does not say (pre-versioning)
    source_files: list[str]       # URL of each rank's file, rank order (zip members: zip://m::url)

    @property
    def tp_size(self) -> int:
        return len(self.ranks)


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
_NUMPY_DTYPES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                 "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType",
                 "Float64DType", "LongDType", "ULongDType", "LongLongDType", "ULongLongDType")


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
    allowed += [getattr(dtypes, n) for n in _NUMPY_DTYPES if dtypes is not None and hasattr(dtypes, n)]
    for name in _MEGATRON_ENUMS:
        module, cls = name.rsplit(".", 1)
        allowed.append((type(cls, (MegatronEnum,), {"__module__": module}), name))
    return tuple(allowed)


def _refused_global(message: str) -> str | None:
    m = _GLOBAL_RE.search(message)
    return (m.group(1) or m.group(2)) if m else None


def _torch_load(src: str | IO[bytes], label: str, head: bytes) -> Any:
    """`torch.load` under the allowlist; every failure becomes a MegatronLoadError naming `label`."""
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):  # zip format, or legacy pickle
        raise MegatronLoadError(f"{label}: not a PyTorch checkpoint (it starts with {head[:8]!r}, "
                                "not a torch.save header); pass a Megatron-LM model_optim_rng.pt")
    mmap = isinstance(src, str) and head.startswith(_ZIP_MAGIC)  # mmap: optimizer bytes stay on disk
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except UnpicklingError as exc:
        name = _refused_global(str(exc))
        if name is None:
            raise MegatronLoadError(f"{label}: cannot be unpickled safely ({_last_line(exc)}); "
                                    "the file is corrupt or not a Megatron-LM checkpoint") from None
        raise UnsafeCheckpointError(
            f"{label}: refused: its pickle asks for {name}, which is not on the allowlist of what "
            "Megatron-LM checkpoints hold (tensors, argparse.Namespace, numpy RNG state). Nothing "
            "from it was run. Only if you trust the file, re-save it without that object.") from None
    except Exception as exc:  # noqa: BLE001 - corrupt input fails in torch in unbounded ways
        raise MegatronLoadError(f"{label}: cannot be read as a PyTorch checkpoint (truncated or "
                                f"corrupt?): {_last_line(exc)}") from None


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(exc).__name__)


def _as_megatron(obj: Any, label: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise MegatronLoadError(f"{label}: holds a {type(obj).__name__}, not a Megatron-LM checkpoint "
                                "dict with a 'model' entry")
    if "model" not in obj:
        if any(re.fullmatch(r"model\d+", str(k)) for k in obj):
            raise MegatronLoadError(f"{label}: has model0, model1, ...: a virtual-pipeline checkpoint; "
                                    "merge it to one stage with Megatron's tools/checkpoint first")
        keys = ", ".join(map(repr, list(obj)[:12])) or "none"
        raise MegatronLoadError(f"{label}: not a Megatron-LM checkpoint: no 'model' entry (top-level "
                                f"keys: {keys}); pass a model_optim_rng.pt or its checkpoint directory")
    if not isinstance(obj["model"], Mapping):
        raise MegatronLoadError(f"{label}: 'model' is a {type(obj['model']).__name__}, not a state dict")
    version = obj.get("checkpoint_version", 0.0)
    if isinstance(version, bool) or not isinstance(version, (int, float)):
        raise MegatronLoadError(f"{label}: checkpoint_version is {version!r}, not a number")
    return {k: obj[k] for k in KEEP if k in obj}


def find_rank_files(names: Iterable[str], read_text: Callable[[str], str], where: str) -> list[str]:
    """Pure: which of `names` (relative paths) are the rank files to load, in rank order."""
    names = sorted(n.strip("/") for n in names)
    ranks: dict[str, list[tuple[int, int, str]]] = {}
    for n in names:
        if m := _RANK_RE.match(n):
            ranks.setdefault(m["dir"], []).append((int(m["tp"]), int(m["pp"] or 0), n))
    trackers = sorted((n for n in names if posixpath.basename(n) == TRACKER), key=lambda n: n.count("/"))
    if trackers:  # Megatron's own rule: the tracker file names the checkpoint to load
        text = read_text(trackers[0]).strip()
        if text != "release" and not text.isdigit():
            raise MegatronLoadError(f"{where}: {trackers[0]} holds {text[:40]!r}; expected 'release' or "
                                    "an iteration number")
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        chosen = posixpath.join(posixpath.dirname(trackers[0]), sub) + "/"
        chosen = chosen.lstrip("/")
        if chosen not in ranks:
            _no_ranks(names, where, f"{trackers[0]} says {text!r} but {chosen}mp_rank_00/"
                                    "model_optim_rng.pt is missing", chosen)
    elif len(ranks) == 1:
        chosen = next(iter(ranks))
    elif ranks:
        raise MegatronLoadError(f"{where}: holds several checkpoints ({', '.join(d or '.' for d in ranks)}) "
                                f"and no {TRACKER}; pass the URL of one of them")
    else:
        pts = [n for n in names if n.endswith((".pt", ".pth"))]
        if len(pts) == 1:
            return pts
        _no_ranks(names, where, "no mp_rank_XX/model_optim_rng.pt" +
                  (f" and several .pt files ({', '.join(pts[:6])})" if pts else " and no .pt file"), "")
    found = sorted(ranks[chosen])
    if {pp for _, pp, _ in found} != {0}:
        raise MegatronLoadError(f"{where}: {chosen or '.'} has pipeline-parallel ranks (mp_rank_XX_YYY); "
                                "merge pipeline stages with Megatron's tools/checkpoint first")
    tps = [tp for tp, _, _ in found]
    if tps != list(range(len(tps))):
        missing = sorted(set(range(max(tps) + 1)) - set(tps))
        raise MegatronLoadError(f"{where}: tensor-parallel ranks {missing} are missing from "
                                f"{chosen or '.'} (found {', '.join(f'mp_rank_{t:02d}' for t in tps)})")
    return [n for _, _, n in found]


def _no_ranks(names: list[str], where: str, what: str, under: str) -> NoReturn:
    if any(n.startswith(under) and n.endswith(".distcp") for n in names):
        what += "; it is a torch_dist checkpoint: save it with --ckpt-format torch first"
    raise MegatronLoadError(f"{where}: {what}")


def load_megatron(url: str, storage_options: dict[str, Any] | None = None) -> MegatronCheckpoint:
    """Load every tensor-parallel rank of the Megatron-LM checkpoint at `url` (file, dir or zip)."""
    loc = open_location(url, storage_options)
    fs, root = loc.fs, loc.root
    loaded: list[tuple[str, dict[str, Any]]] = []
    if fs.isdir(root):
        def read_text(name: str) -> str:
            return fs.cat_file(loc.path(name)).decode(errors="replace")
        for rel in find_rank_files(list_files(loc), read_text, url):
            loaded.append((loc.url_of(rel), _load_file(fs, loc.path(rel), loc.url_of(rel), loc.is_local)))
    elif fs.isfile(root):
        with fs.open(root, "rb") as f:
            head = f.read(8)
        if head.startswith(_ZIP_MAGIC) and not _is_torch_zip(fs, root, url):
            loaded = _load_archive(fs, root, url)
        else:
            loaded.append((url, _load_file(fs, root, url, loc.is_local)))
    else:
        raise MegatronLoadError(f"{url}: no such file or directory")
    return _assemble(loaded, url)


def _load_file(fs: Any, path: str, label: str, local: bool) -> dict[str, Any]:
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if not local:  # remote: fsspec's buffered file serves torch's seeks with range reads
            f.seek(0)
            return _as_megatron(_torch_load(f, label, head), label)
    return _as_megatron(_torch_load(path, label, head), label)


def _is_torch_zip(fs: Any, path: str, url: str) -> bool:
    """torch.save's zip format is a zip too: `<name>/data.pkl` + `<name>/version` tell it apart."""
    with fs.open(path, "rb") as f, _zip(f, url) as zf:
        names = zf.namelist()
    return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)


def _zip(f: IO[bytes], url: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise MegatronLoadError(f"{url}: a zip (torch.save's format, or an archive) that cannot be read "
                                f"({exc}): truncated or corrupt; download it again") from None


def _load_archive(fs: Any, path: str, url: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with fs.open(path, "rb") as f, _zip(f, url) as zf:
        members = [n for n in zf.namelist() if not n.endswith("/")]
        for rel in find_rank_files(members, lambda n: zf.read(n).decode(errors="replace"), url):
            label = f"zip://{rel}::{url}"
            # torch seeks back and forth; a compressed zip member cannot seek cheaply, so read it.
            data = zf.read(rel)
            out.append((label, _as_megatron(_torch_load(io.BytesIO(data), label, data[:8]), label)))
            del data
    return out


def _assemble(loaded: list[tuple[str, dict[str, Any]]], url: str) -> MegatronCheckpoint:
    labels = [label for label, _ in loaded]
    versions = {float(sd.get("checkpoint_version", 0.0)) for _, sd in loaded}
    if len(versions) > 1:
        raise MegatronLoadError(f"{url}: ranks disagree on checkpoint_version ({sorted(versions)}); "
                                "they come from different runs")
    args = loaded[0][1].get("args")
    tp = megatron_arg(args, "tensor_model_parallel_size", megatron_arg(args, "model_parallel_size", None))
    if isinstance(tp, int) and tp != len(loaded):
        raise MegatronLoadError(f"{url}: args say tensor_model_parallel_size={tp} but {len(loaded)} rank "
                                f"file(s) were found ({', '.join(labels)}); pass the checkpoint directory "
                                "holding every mp_rank_XX")
    if (megatron_arg(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise MegatronLoadError(f"{url}: pipeline-parallel checkpoints are not supported; merge the "
                                "stages with Megatron's tools/checkpoint first")
    return MegatronCheckpoint([sd for _, sd in loaded], args, versions.pop(), labels)


def megatron_arg(args: Any, name: str, default: Any = None) -> Any:
    """`args.<name>`: Megatron stores an argparse.Namespace; some tools store a dict instead."""
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default) if args is not None else default

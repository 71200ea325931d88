"""Find and safely load a Megatron-LM checkpoint (torch format) from any fsspec location.

Accepted shapes, as Megatron-LM and NVIDIA ship them:
  * one `.pt` file (`torch.save` output, zip or pre-1.6 legacy format);
  * a checkpoint directory: `latest_checkpointed_iteration.txt` holds "release" or an iteration
    number and picks `release/` or `iter_0000NNN/`, which holds `mp_rank_XX/model_optim_rng.pt`,
    one per tensor-parallel rank (all ranks are returned, in rank order);
  * a `.zip` holding such a tree (NVIDIA's `megatron_lm_345m_v0.0.zip`) or a single `.pt`.

Pickles are never trusted: `torch.load(weights_only=True)` with an explicit allowlist of what real
Megatron checkpoints hold besides tensors. Anything else is refused before it can run, with the
global it asked for named in the error. Nor are sizes: before torch sees a file, `megatron_pickle`
checks that loading it allocates no more than the file holds, zip members are refused on their
declared size before a byte is inflated, and the tracker file is read 64 bytes at most.
"""
from __future__ import annotations

import io
import posixpath
import re
import zipfile
import zlib
from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pickle import UnpicklingError
from typing import IO, Any, NoReturn

__all__ = ["MegatronCheckpoint", "MegatronEnum", "MegatronLoadError", "UnsafeCheckpointError",
           "find_rank_files", "inspect_megatron", "load_megatron", "megatron_arg"]

import torch

from ckptflow.storage.files import list_files
from ckptflow.storage.urls import open_location

from ckptflow.tasks.megatron.safe import (MegatronEnum, MegatronLoadError, UnsafeCheckpointError, human, safe_globals,
                           unsafe_global)
from ckptflow.tasks.megatron.torchfile import scan_torch_file
from ckptflow.tasks.megatron.tracker import MAX_ITERATION, TRACKER, TRACKER_CAP

# Archive members are inflated into memory (torch seeks back and forth in a file; a deflate stream
# cannot seek), so each member's declared size is checked before a byte is inflated. Deflate
# shrinks trained weights ~1.1x (zeros ~1000x): a member may be MEMBER_RATIO times its compressed
# size, or up to RATIO_FREE whatever its ratio (small files of zeros are fine), and at most half
# the memory available (torch copies it once more); past that, unzip it: a .pt on disk is mmapped.
MEMBER_RATIO = 20
RATIO_FREE = 64 << 20
# Only these top-level entries are kept: optimizer and RNG states can be 3x the model's size.
KEEP = ("model", "args", "checkpoint_version", "iteration")
_RANK_RE = re.compile(r"^(?P<dir>(?:.*/)?)mp_rank_(?P<tp>\d{2})(?:_(?P<pp>\d{3}))?/model_optim_rng\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


@dataclass
class MegatronCheckpoint:
    ranks: list[dict[str, Any]]   # per tensor-parallel rank, rank order; only the KEEP entries
    args: Namespace | dict | None  # Megatron's training arguments (rank 0); None in old releases
    checkpoint_version: float     # 0.0 when the checkpoint does not say (pre-versioning)
    source_files: list[str]       # URL of each rank's file, rank order (zip members: zip://m::url)

    @property
    def tp_size(self) -> int:
        return len(self.ranks)


def _refused_global(message: str) -> str | None:
    m = _GLOBAL_RE.search(message)
    return (m.group(1) or m.group(2)) if m else None


def _torch_load(f: IO[bytes], size: int, label: str, path: str | None, meta: bool) -> Any:
    """`torch.load` of `f` (or of the local `path`) under the allowlist, after the bounded scan;
    `meta`: the scan's tree only (meta tensors). Every failure is a MegatronLoadError naming `label`."""
    f.seek(0)
    head = f.read(8)
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):  # zip format, or legacy pickle
        raise MegatronLoadError(f"{label}: not a PyTorch checkpoint (it starts with {head[:8]!r}, "
                                "not a torch.save header); pass a Megatron-LM model_optim_rng.pt")
    tree = scan_torch_file(f, size, label)
    if meta:
        return tree
    del tree
    f.seek(0)
    mmap = path is not None and head.startswith(_ZIP_MAGIC)  # mmap: optimizer bytes stay on disk
    src: str | IO[bytes] = path if path is not None else f
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except UnpicklingError as exc:
        name = _refused_global(str(exc))
        if name is None:
            raise MegatronLoadError(f"{label}: cannot be unpickled safely ({_last_line(exc)}); "
                                    "the file is corrupt or not a Megatron-LM checkpoint") from None
        raise unsafe_global(label, name) from None
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
        raw = read_text(trackers[0])  # callers read TRACKER_CAP + 1 characters at most
        text = raw.strip()
        if len(raw) > TRACKER_CAP or not (text == "release" or re.fullmatch(r"[0-9]{1,13}", text)
                                          and int(text) <= MAX_ITERATION):
            held = f"more than {TRACKER_CAP} bytes" if len(raw) > TRACKER_CAP else repr(text[:40])
            raise MegatronLoadError(f"{where}: {trackers[0]} holds {held}; expected 'release' or an "
                                    f"iteration number (at most {MAX_ITERATION:.0e})")
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


def load_megatron(url: str, storage_options: dict[str, Any] | None = None,
                  meta: bool = False) -> MegatronCheckpoint:
    """Load every tensor-parallel rank of the Megatron-LM checkpoint at `url` (file, dir or zip).

    `meta=True` reads the pickles only: tensors are meta tensors (shape, dtype; no bytes), which is
    enough to check a checkpoint converts before any tensor is read (see `inspect_megatron`).
    """
    loc = open_location(url, storage_options)
    fs, root = loc.fs, loc.root
    loaded: list[tuple[str, dict[str, Any]]] = []
    if fs.isdir(root):
        def read_text(name: str) -> str:
            return fs.cat_file(loc.path(name), start=0, end=TRACKER_CAP + 1).decode(errors="replace")
        for rel in find_rank_files(list_files(loc), read_text, url):
            path, label = loc.path(rel), loc.url_of(rel)
            loaded.append((label, _load_file(fs, path, label, loc.is_local, meta)))
    elif fs.isfile(root):
        with fs.open(root, "rb") as f:
            head = f.read(8)
        if head.startswith(_ZIP_MAGIC) and not _is_torch_zip(fs, root, url):
            loaded = _load_archive(fs, root, url, meta)
        else:
            loaded.append((url, _load_file(fs, root, url, loc.is_local, meta)))
    else:
        raise MegatronLoadError(f"{url}: no such file or directory")
    return _assemble(loaded, url)


def inspect_megatron(url: str, storage_options: dict[str, Any] | None = None) -> MegatronCheckpoint:
    """`load_megatron` with meta tensors: every check that needs no tensor bytes, in bounded memory."""
    return load_megatron(url, storage_options, meta=True)


def _load_file(fs: Any, path: str, label: str, local: bool, meta: bool) -> dict[str, Any]:
    # Remote: fsspec's buffered file serves torch's seeks with range reads; local: torch opens the path.
    with fs.open(path, "rb") as f:
        return _as_megatron(_torch_load(f, fs.size(path), label, path if local else None, meta), label)


def _is_torch_zip(fs: Any, path: str, url: str) -> bool:
    """torch.save's zip format is a zip too: `<name>/data.pkl` + `<name>/version` tell it apart."""
    with fs.open(path, "rb") as f, _zip(f, url) as zf:
        names = zf.namelist()
    return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)


def _zip(f: IO[bytes], url: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise MegatronLoadError(f"{url}: a zip (torch.save's format, or an archive) that cannot be read "
                                f"({exc}): truncated or corrupt; download it again") from None


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            line = next(ln for ln in f if ln.startswith(b"MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None  # not Linux: the ratio and the archive's own size still bound a member


def _member_cap(info: zipfile.ZipInfo, archive_size: int, label: str) -> int:
    """The bytes `info` may inflate to, from the zip directory alone (see MEMBER_RATIO)."""
    size = info.file_size
    if info.compress_size > archive_size:
        raise MegatronLoadError(f"{label}: the zip directory says {human(info.compress_size)} compressed, "
                                f"in a {human(archive_size)} archive: corrupt or forged; refused")
    if size > max(RATIO_FREE, MEMBER_RATIO * info.compress_size):
        raise MegatronLoadError(f"{label}: would inflate {human(info.compress_size)} to {human(size)} "
                                f"({size // max(info.compress_size, 1)}x; weights compress about 1.1x, "
                                f"at most {MEMBER_RATIO}x is accepted): a zip bomb, not a checkpoint; refused")
    if (free := _available_memory()) is not None and size > free // 2:
        raise MegatronLoadError(f"{label}: {human(size)} inflated would not fit in memory ({human(free)} "
                                "available); unzip the archive and pass the directory instead")
    return size


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, label: str) -> bytes:
    """At most `limit` + 1 bytes of `info`: zipfile stops at the declared size, and a stream that
    would inflate past it fails its CRC there, so a lying directory costs no more than it claims."""
    try:
        with zf.open(info) as member:
            return member.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise MegatronLoadError(f"{label}: the archive member cannot be inflated ({exc}): truncated, "
                                "corrupt or forged; download it again") from None


def _load_archive(fs: Any, path: str, url: str, meta: bool) -> list[tuple[str, dict[str, Any]]]:
    out = []
    archive_size = fs.size(path)
    with fs.open(path, "rb") as f, _zip(f, url) as zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}

        def read_text(name: str) -> str:
            return _inflate(zf, infos[name], TRACKER_CAP, f"zip://{name}::{url}").decode(errors="replace")
        for rel in find_rank_files(infos, read_text, url):
            label = f"zip://{rel}::{url}"
            data = _inflate(zf, infos[rel], _member_cap(infos[rel], archive_size, label), label)
            buf = io.BytesIO(data)
            del data
            out.append((label, _as_megatron(_torch_load(buf, buf.getbuffer().nbytes, label, None, meta), label)))
            del buf
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

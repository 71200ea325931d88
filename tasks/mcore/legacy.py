"""Legacy `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` checkpoints → the torch_dist-shaped index.

Each rank file is a `torch.save` zip. Its directory (the file's last bytes) locates `data.pkl`,
which the GPT-2 path's bounded scan reads without building anything (`pickle_scan`): every model
tensor becomes (storage, offset, shape) and so a byte range of the storage's `data/N` member,
whose local header is read to find where its bytes start. Optimizer state is in the pickle too
but no byte of it is read. Then each rank's local tensors are placed in the global picture the
way Megatron lays them out (`legacy_layout`).
"""
from __future__ import annotations

from typing import Any

import torch

from ckptflow.storage.urls import Location
from ckptflow.tasks.mcore.archive import ArchiveError, Member, NeedMore, directory, payload_offset
from ckptflow.tasks.mcore.common import plain
from ckptflow.tasks.mcore.dcp_metadata import DTYPES, ITEMSIZE, skipped_key
from ckptflow.tasks.mcore.index import GlobalTensor
from ckptflow.tasks.mcore.legacy_layout import LocalTensor, RankFile, build_global, rank_files
from ckptflow.tasks.mcore.tiling import check_tensor
from ckptflow.tasks.megatron.pickle_scan import PICKLE_CAP, scan_pickle
from ckptflow.tasks.megatron.safe import MegatronLoadError

TAIL = 64 << 10
DIRECTORY_CAP = 64 << 20    # ~100 bytes an entry: far more storages than any rank file holds
MAX_STORAGES = 1 << 18
LOCAL_HEADER = 30 + 1024    # fixed part + name + torch's alignment padding


def _read(loc: Location, name: str, start: int, end: int) -> bytes:
    data = loc.fs.cat_file(loc.path(name), start=start, end=end)
    if len(data) != end - start:
        raise MegatronLoadError(f"{loc.url_of(name)}: short read at bytes {start}..{end}: truncated?")
    return data


def scan_rank_file(loc: Location, name: str, size: int) -> tuple[dict[str, LocalTensor], Any, Any]:
    """(model key → where its bytes are, saved args, iteration) of one rank file, by a few range reads."""
    label = loc.url_of(name)
    try:
        tail = _read(loc, name, max(0, size - TAIL), size)
        try:
            entries, limit = directory(tail, size, MAX_STORAGES)
        except NeedMore as more:
            if more.n > DIRECTORY_CAP:
                raise ArchiveError(f"a {more.n}-byte zip directory") from None
            entries, limit = directory(_read(loc, name, size - more.n, size), size, MAX_STORAGES)
        members = {n: Member(n, header, length, limit) for n, header, length in entries}
        pkl = [m for n, m in members.items() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ArchiveError("not a torch.save zip (no single <name>/data.pkl)")
        if pkl[0].size > PICKLE_CAP:
            raise MegatronLoadError(f"{label}: its pickle is {pkl[0].size} bytes, more than the "
                                    f"{PICKLE_CAP} a Megatron rank file's is ever near: refused")
        head = _read(loc, name, pkl[0].header, min(size, pkl[0].header + LOCAL_HEADER + pkl[0].size))
        start = payload_offset(head, pkl[0])
        data = head[start - pkl[0].header:start - pkl[0].header + pkl[0].size]
    except ArchiveError as exc:
        raise MegatronLoadError(f"{label}: not a readable torch.save zip ({exc}); corrupt or not a "
                                "Megatron rank file (a pre-1.6 torch file: re-save it)") from None
    tree, scan = scan_pickle(data, label)
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise MegatronLoadError(f"{label}: no 'model' state dict in it; not a Megatron rank file "
                                "(virtual pipeline stages, model0/model1..., are not supported)")
    nested = [k for k, v in tree["model"].items() if isinstance(v, dict)]
    if nested or not any(isinstance(v, torch.Tensor) for v in tree["model"].values()):
        raise MegatronLoadError(f"{label}: its model state is not Megatron-Core's flat one "
                                f"({'nested under ' + repr(nested[0]) if nested else 'no tensors'}); a "
                                "Megatron-LM (pre-Core) checkpoint such as GPT-2's is read by the GPT-2 path")
    prefix = pkl[0].name[: -len("data.pkl")]
    wanted: dict[str, tuple[torch.Tensor, str, int]] = {}
    for key, value in tree["model"].items():
        if not isinstance(value, torch.Tensor) or skipped_key(key):
            continue  # _extra_state (None, or TransformerEngine's uint8 tensor) and other non-weights
        storage, offset = scan.sources[id(value)]
        if not value.is_contiguous():
            raise MegatronLoadError(f"{label}: tensor {key!r} is not contiguous (strides {list(value.stride())});"
                                    " Megatron saves contiguous parameters: refused")
        if str(value.dtype).removeprefix("torch.") not in DTYPES:
            raise MegatronLoadError(f"{label}: tensor {key!r} has dtype {value.dtype}, not a weight dtype")
        wanted[key] = (value, storage, offset)
    heads = _local_headers(loc, name, label, {members_key(prefix, s): members.get(members_key(prefix, s))
                                               for _, s, _ in wanted.values()})
    out = {}
    for key, (value, storage, offset) in wanted.items():
        member_name = members_key(prefix, storage)
        member = members[member_name]
        nbytes = value.numel() * value.element_size()
        at = offset * value.element_size()
        if at + nbytes > member.size:
            raise MegatronLoadError(f"{label}: tensor {key!r} needs {nbytes} bytes at {at} of storage {storage}, "
                                    f"which holds {member.size}: truncated or forged; refused")
        out[key] = LocalTensor(name, heads[member_name] + at, nbytes, tuple(value.shape),
                               DTYPES[str(value.dtype).removeprefix("torch.")])
    return out, tree.get("args"), tree.get("iteration")


def members_key(prefix: str, storage: str) -> str:
    return f"{prefix}data/{storage}"


def _local_headers(loc: Location, name: str, label: str, members: dict[str, Member | None]) -> dict[str, int]:
    """Storage member → absolute offset of its bytes, reading every local header in one batch."""
    for n, m in members.items():
        if m is None:
            raise MegatronLoadError(f"{label}: its pickle names storage {n} but the zip has no such member; "
                                    "truncated or forged")
    items = sorted(members.items(), key=lambda kv: kv[1].header)  # type: ignore[union-attr]
    path = loc.path(name)
    starts = [m.header for _, m in items]  # type: ignore[union-attr]
    ends = [min(m.limit, m.header + LOCAL_HEADER) for _, m in items]  # type: ignore[union-attr]
    blobs = loc.fs.cat_ranges([path] * len(items), starts, ends) if items else []
    out = {}
    for (n, m), blob in zip(items, blobs):
        try:
            if isinstance(blob, Exception):
                raise ArchiveError(str(blob))
            out[n] = payload_offset(blob, m)  # type: ignore[arg-type]
        except ArchiveError as exc:
            raise MegatronLoadError(f"{label}: storage {n}: {exc}; corrupt or forged") from None
    return out


def read_legacy(loc: Location, files: dict[str, int]) -> tuple[dict[str, GlobalTensor], dict[str, Any], int | None]:
    """Every model tensor of the legacy checkpoint at `loc` (an iteration folder), global and stacked."""
    names = sorted(n for n in files if n.endswith("/model_optim_rng.pt"))
    if not names:
        raise MegatronLoadError(f"{loc.url}: no mp_rank_*/model_optim_rng.pt files")
    first, args0, iteration = scan_rank_file(loc, names[0], files[names[0]])
    args = plain(args0)
    if not isinstance(args, dict) or not args:
        raise MegatronLoadError(f"{loc.url_of(names[0])}: saves no training arguments; the parallel layout "
                                "(TP/PP/EP sizes) cannot be known without them")
    layout = rank_files(names, args, loc.url)
    locals_: dict[RankFile, dict[str, LocalTensor]] = {}
    for rf in layout:
        locals_[rf] = first if rf.name == names[0] else scan_rank_file(loc, rf.name, files[rf.name])[0]
    try:
        tensors = build_global(locals_, args, loc.url)
    except MegatronLoadError as exc:
        if str(exc).startswith("tensor "):  # raised where the folder is not known
            raise MegatronLoadError(f"{loc.url}: {exc}") from None
        raise
    for t in tensors.values():
        check_tensor(loc.url, t.key, t.shape, ITEMSIZE[t.dtype], t.chunks, files)
    return tensors, args, iteration if type(iteration) is int else None


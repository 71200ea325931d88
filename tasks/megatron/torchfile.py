"""The framing around a torch.save pickle, checked before torch reads it: sizes, not contents.

A zip-format file (torch >= 1.6) is `<name>/data.pkl` plus one uncompressed record per storage;
a legacy file is five pickles in a row, then each storage's bytes. Either way the pickle says how
big each storage is, and torch allocates what it says: `scan_torch_file` checks each claim
against the bytes the file holds, after `megatron_pickle` has read the pickle without building it.
"""
from __future__ import annotations

import zipfile
from typing import IO, Any

import torch

from ckptflow.tasks.megatron.pickle_scan import PICKLE_CAP, scan_pickle
from ckptflow.tasks.megatron.safe import MegatronLoadError, human


def scan_torch_file(f: IO[bytes], size: int, label: str) -> Any:
    """Check the torch.save file `f` (`size` bytes) can be loaded in bounded memory; its meta tree."""
    f.seek(0)
    if f.read(4) == b"PK\x03\x04":
        return _scan_zip(f, size, label)
    f.seek(0)
    head = f.read(PICKLE_CAP)
    pos, values = 0, []
    for _ in range(3):  # magic number, protocol version, sys info: torch's legacy header pickles
        value, scan = scan_pickle(head, label, cut=len(head) < size, start=pos)
        values.append(value)
        pos = scan.pos
    if values[:2] != [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION]:
        raise MegatronLoadError(f"{label}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                                "bad legacy-format magic number")
    tree, scan = scan_pickle(head, label, cut=len(head) < size, start=pos)
    keys, end = scan_pickle(head, label, cut=len(head) < size, start=scan.pos)
    if not isinstance(keys, list) or set(map(str, keys)) != set(scan.storages):
        raise MegatronLoadError(f"{label}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                                "its storage list does not match its tensors")
    need = sum(8 + numel * dtype.itemsize for dtype, numel in scan.storages.values())  # size + bytes
    if size - end.pos < need:
        raise MegatronLoadError(f"{label}: its tensors claim {human(need)} of storage but only "
                                f"{human(size - end.pos)} follow the pickle: truncated or forged; refused")
    return tree


def _scan_zip(f: IO[bytes], size: int, label: str) -> Any:
    try:
        with zipfile.ZipFile(f) as zf:
            return _scan_records(zf, size, label)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise MegatronLoadError(f"{label}: cannot be read as a PyTorch checkpoint (truncated or "
                                f"corrupt?): {exc}") from None


def _scan_records(zf: zipfile.ZipFile, size: int, label: str) -> Any:
    infos = zf.infolist()
    pkl = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise MegatronLoadError(f"{label}: a zip without exactly one <name>/data.pkl: not a torch.save file")
    for i in infos:  # torch.save stores every record uncompressed, so a record is no bigger than the file
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size \
                or i.header_offset + i.compress_size > size:
            raise MegatronLoadError(f"{label}: record {i.filename} is compressed or claims {human(i.file_size)} "
                                    f"in a {human(size)} file; torch.save writes neither: refused")
    if pkl[0].file_size > PICKLE_CAP:
        raise MegatronLoadError(f"{label}: its pickle is {human(pkl[0].file_size)}, larger than "
                                f"{human(PICKLE_CAP)}; a Megatron-LM checkpoint's is well under that: refused")
    prefix = pkl[0].filename[: -len("data.pkl")]
    with zf.open(pkl[0]) as member:
        data = member.read(PICKLE_CAP + 1)
    tree, scan = scan_pickle(data, label)
    records = {i.filename: i.file_size for i in infos}
    for key, (dtype, numel) in scan.storages.items():
        held = records.get(f"{prefix}data/{key}")
        if held is None or held < numel * dtype.itemsize:
            raise MegatronLoadError(f"{label}: storage {key} claims {human(numel * dtype.itemsize)} but the "
                                    f"file holds {'no such record' if held is None else human(held)}; refused")
    return tree

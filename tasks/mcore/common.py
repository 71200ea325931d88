"""Training arguments and iteration from `common.pt` (torch_dist) or a rank file (legacy).

Both are `torch.save` pickles; they go through the GPT-2 path's bounded, allowlisted scan
(`tasks/megatron/torchfile.py`): nothing runs, tensors stay meta, sizes are checked first.
The Namespace becomes a dict of plain values (enums → their value, dtypes → "torch.bfloat16").
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch

from ckptflow.storage.urls import Location
from ckptflow.tasks.megatron.safe import MegatronEnum, MegatronLoadError
from ckptflow.tasks.megatron.torchfile import scan_torch_file

COMMON = "common.pt"
COMMON_CAP = 64 << 20  # args, iteration, RNG: a few hundred KB in real saves


def plain(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-like data; what has no plain form (tensors, numpy) becomes None."""
    if depth > 8:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, MegatronEnum):
        return plain(value.value, depth + 1)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return None


def scan_file(loc: Location, name: str, cap: int) -> Any:
    """The meta tree of torch.save file `name` (tensors as meta tensors), read whole up to `cap`."""
    label = loc.url_of(name)
    try:
        size = int(loc.fs.info(loc.path(name))["size"])
    except FileNotFoundError:
        raise MegatronLoadError(f"{label}: missing") from None
    if size > cap:
        raise MegatronLoadError(f"{label}: {size} bytes; expected well under {cap} here: refused")
    with loc.fs.open(loc.path(name), "rb") as f:
        return scan_torch_file(f, size, label)


def read_common(loc: Location) -> tuple[dict[str, Any], int | None]:
    """(args as a plain dict, iteration) from `common.pt`; ({}, None) when there is none.

    The pip package's `dist_checkpointing.save` writes no args; Megatron-LM's training loop does."""
    try:
        loc.fs.info(loc.path(COMMON))
    except FileNotFoundError:
        return {}, None
    tree = scan_file(loc, COMMON, COMMON_CAP)
    if not isinstance(tree, dict):
        raise MegatronLoadError(f"{loc.url_of(COMMON)}: holds a {type(tree).__name__}, not Megatron's dict of "
                                "common state")
    args = plain(tree.get("args"))
    iteration = tree.get("iteration")
    return (args if isinstance(args, dict) else {}), (iteration if type(iteration) is int else None)

"""`read_mcore_index(url)`: any Megatron-Core checkpoint, either format, as one `McoreIndex`.

The readers' public API:
  * `read_mcore_index(url, storage_options=None) -> McoreIndex` (this module): the save root, an
    `iter_N` or a `release` folder, torch_dist or legacy, any fsspec URL; errors are
    `MegatronLoadError` (a `UserError`: one line naming the file and what to do).
  * `chunks_for(tensor, region=None) -> list[Piece]` (`regions`): pure plan of the byte ranges
    `(file start, file end, offset in the block)` of `Piece.chunk.file` that build a block of a
    global tensor, C-contiguous; consecutive rows merged.
  * `read_region(loc, tensor, region=None) -> torch.Tensor` (`assemble`): the same, read.
"""
from __future__ import annotations

from typing import Any

from ckptflow.storage.files import read_json
from ckptflow.storage.urls import Location, StorageError, open_location
from ckptflow.tasks.mcore.common import read_common
from ckptflow.tasks.mcore.index import McoreIndex
from ckptflow.tasks.mcore.locate import find_checkpoint
from ckptflow.tasks.mcore.torch_dist import read_torch_dist
from ckptflow.tasks.megatron.safe import MegatronLoadError


def parallel_sizes(args: dict[str, Any]) -> tuple[int, int, int]:
    """(TP, PP, EP) from the saved arguments; 1 where they do not say."""
    def size(name: str) -> int:
        v = args.get(name)
        if v is None:
            return 1
        if type(v) is not int or v < 1:
            raise ValueError(f"{name}={v!r}")
        return v
    return size("tensor_model_parallel_size"), size("pipeline_model_parallel_size"), size("expert_model_parallel_size")


def _check_backend(loc: Location) -> None:
    try:
        meta = read_json(loc, "metadata.json")
    except StorageError:
        return  # torch.distributed.checkpoint saves without Megatron have none; .metadata decides
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend not in (None, "torch_dist"):
        raise MegatronLoadError(f"{loc.url_of('metadata.json')}: sharded_backend is {backend!r}; only torch_dist "
                                "checkpoints are read (re-save with --ckpt-format torch_dist)")


def read_mcore_index(url: str, storage_options: dict[str, Any] | None = None) -> McoreIndex:
    """The global tensors of the Megatron-Core checkpoint at `url` (save root or iteration folder)."""
    found = find_checkpoint(open_location(url, storage_options))
    loc = found.loc
    if found.format == "torch_dist":
        _check_backend(loc)
        args, iteration = read_common(loc)
        sizes = {n: s for n, s in found.files.items() if n.endswith(".distcp")}
        tensors, _ = read_torch_dist(loc, sizes)
    else:
        from ckptflow.tasks.mcore.legacy import read_legacy

        tensors, args, iteration = read_legacy(loc, found.files)
    if not tensors:
        raise MegatronLoadError(f"{loc.url}: holds no model tensors (only optimizer, RNG or other state); "
                                "not a checkpoint to convert")
    try:
        tp, pp, ep = parallel_sizes(args)
    except ValueError as exc:
        raise MegatronLoadError(f"{loc.url}: the saved arguments say {exc}; not a parallel layout") from None
    return McoreIndex(loc.url, found.format, iteration if iteration is not None else found.iteration,
                      args, tp, pp, ep, dict(sorted(tensors.items())))

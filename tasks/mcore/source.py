"""Megatron-Core SOURCEs before anything runs: found by layout, read into an index, planned.

`is_megatron_core` tells a Megatron-Core save (torch_dist files, or legacy rank files holding
`decoder.` / `embedding.` keys) from a Megatron-LM GPT-2 one, whose legacy saves look the same on
disk. `plan_megatron_core` reads the index (`.metadata` / zip directories, never tensor bytes) and
plans every output shard: what the CLI's pre-flight, `--dry-run`, `inspect` and the flow call.
No Prefect here.
"""
from __future__ import annotations

from typing import Any

from ckptflow.storage.errors import UserError
from ckptflow.storage.files import read_json
from ckptflow.storage.urls import StorageError, open_location
from ckptflow.tasks.mcore.hf_config import EMBEDDING, OUTPUT, tokenizer_vocab_size
from ckptflow.tasks.mcore.index import McoreIndex
from ckptflow.tasks.mcore.plan import McorePlan, plan_mcore
from ckptflow.tasks.plan.sizes import parse_size
from ckptflow.tasks.presets.mcore import pick_table

MCORE_PREFIXES = ("decoder.", "embedding.", "output_layer.")


def is_megatron_core(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """A Megatron-Core save by its layout: torch_dist files, or legacy rank files holding
    Megatron-Core keys (GPT-2's legacy saves look the same on disk but hold `language_model.…`)."""
    from ckptflow.tasks.mcore.locate import find_checkpoint

    try:
        found = find_checkpoint(open_location(source, storage_options))
    except (UserError, OSError, ValueError):
        return False  # not a Megatron save root or iteration folder: the GPT-2 path says what it is
    if found.format == "torch_dist":
        return True
    first = sorted(n for n in found.files if n.endswith("model_optim_rng.pt"))[:1]
    if not first:
        return False
    from ckptflow.tasks.mcore.legacy import scan_rank_file  # torch (pickle scan): only for rank files

    try:
        keys = scan_rank_file(found.loc, first[0], found.files[first[0]])[0]
    except (UserError, OSError, ValueError):
        return False
    return any(k.startswith(MCORE_PREFIXES) for k in keys)


def _tokenizer_vocab(tokenizer: str | None, storage_options: dict[str, Any] | None) -> int | None:
    if not tokenizer:
        return None
    tok = open_location(tokenizer, storage_options)
    if not tok.fs.exists(tok.path("tokenizer.json")):
        return None
    return tokenizer_vocab_size(read_json(tok, "tokenizer.json"))


def padded_vocab(index: McoreIndex) -> int | None:
    """Rows of the saved embedding (or output layer): the vocabulary as padded for TP."""
    for key in (EMBEDDING, OUTPUT):
        if key in index.tensors and index.tensors[key].shape:
            return int(index.tensors[key].shape[0])
    return None


def plan_megatron_core(source: str, config: str | None = None, tokenizer: str | None = None,
                       family: str | None = None, table: str | None = None, max_shard_size: str | int = "5GB",
                       storage_options: dict[str, Any] | None = None,
                       allow_unknown_vocab: bool = False) -> tuple[McoreIndex, McorePlan]:
    """Read the index and plan every output shard; raises a UserError naming the key, file or args.

    `allow_unknown_vocab` (inspect only: it has no --tokenizer/--config) plans a save whose true
    vocabulary size nothing gives with the padded one (`vocab_unknown` says whether it did), so
    the report can show the plan and say so; `megatron` itself refuses such a save."""
    from ckptflow.tasks.mcore.reader import read_mcore_index

    override = read_json(open_location(config, storage_options), "") if config else None
    if override is not None and not isinstance(override, dict):
        raise StorageError(f"--config {config}: must be a JSON object of config.json values")
    index = read_mcore_index(source, storage_options)
    mapping = pick_table(index.args, family, table, storage_options)
    vocab = _tokenizer_vocab(tokenizer, storage_options)
    if allow_unknown_vocab and vocab is None and vocab_unknown(index, override):
        vocab = padded_vocab(index)
    mp = plan_mcore(index, mapping, parse_size(max_shard_size), override, vocab)
    return index, mp


def vocab_unknown(index: McoreIndex, override: dict[str, Any] | None = None) -> bool:
    """Nothing saved or given holds the true vocabulary size (no tokenizer passed either)."""
    return index.args.get("vocab_size") is None and "vocab_size" not in (override or {})

"""The Megatron-LM GPT-2 path's checks that need no tensor bytes, without Prefect.

`megatron_preflight` makes every check the import task makes that needs no tensor bytes (zip
directory, tracker, pickle scan, names, config, every shape), in bounded memory: the CLI calls it
before it imports Prefect or starts a server, so a hostile SOURCE is refused in one line by a
process that never loaded Prefect. The flow (flows/megatron.py) makes the same checks again
before it locks or writes DEST."""
from __future__ import annotations

from typing import Any

from ckptflow.storage.files import read_json
from ckptflow.storage.urls import StorageError, open_location
from ckptflow.tasks.megatron.load import inspect_megatron
from ckptflow.tasks.megatron.mapping import convert_megatron
from ckptflow.tasks.presets.megatron import MegatronTable, load_megatron_table


def megatron_preflight(source: str, config: str | None = None,
                       storage_options: dict[str, Any] | None = None, table: str | None = None) -> dict[str, Any]:
    """Check SOURCE converts, reading pickles and zip directories only; the GPT-2 config it would
    get. Raises a UserError (one line, naming the file or tensor) for anything the import refuses."""
    src = open_location(source, storage_options)
    if not src.fs.exists(src.root):
        raise StorageError(f"{source}: not found")
    override = read_json(open_location(config, storage_options), "") if config else None
    mapping = load_megatron_table(table, storage_options) if table else None
    return preflight(source, override, mapping, storage_options)


def preflight(source: str, override: Any, table: MegatronTable | None,
              storage_options: dict[str, Any] | None) -> dict[str, Any]:
    ck = inspect_megatron(source, storage_options)  # meta tensors: shapes and dtypes, no bytes
    # check_replicated compares values, which meta tensors lack; the import task compares them.
    return convert_megatron(ck, override, table, check_replicated=False)[1]

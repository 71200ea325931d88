"""The Megatron import task: a pickled checkpoint in, one safetensors file + config.json out.

A `.pt` is one pickle, so this is the one step that holds the whole model in memory (GPT-2
sizes); everything after it streams like the other stages. It is cached like a shard task
(source fingerprints + config override + code version), so a rerun never unpickles again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import CachePolicy

from ckptflow.storage.files import CONFIG_NAME, write_json
from ckptflow.storage.safetensors_format import TensorSpec
from ckptflow.storage.transient import TRANSIENT_RETRIES
from ckptflow.storage.urls import open_location
from ckptflow.storage.writer import SafetensorsWriter

from ckptflow.tasks.run.resume import shard_key
from ckptflow.tasks.megatron.load import load_megatron
from ckptflow.tasks.megatron.mapping import convert_megatron
from ckptflow.tasks.presets.megatron import parse_megatron_table
from ckptflow.tasks.kernels.dtype_map import TORCH_TO_ST

IMPORTED = "model.safetensors"


@dataclass
class ImportCachePolicy(CachePolicy):
    """The import is one task over a whole (small, GPT-2) checkpoint: Prefect's cache, keyed on
    what determines its output (`shard_key` with its params), reuses it across flow runs."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return shard_key(inputs["stage"], None, inputs["fingerprints"], inputs["dest"], inputs.get("params"))


@task(name="megatron-import", cache_policy=ImportCachePolicy(), persist_result=True, result_serializer="json",
      cache_result_in_memory=False, **TRANSIENT_RETRIES)
def import_megatron(stage: str, source: str, dest: str, fingerprints: list[tuple[str, int, str | None]],
                    params: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert the Megatron checkpoint at `source` into `dest/model.safetensors` + config.json."""
    t0 = time.perf_counter()
    ck = load_megatron(source, storage_options)
    table = params.get("table")  # a user's --table, as content: {"source": its URL, "doc": its rows}
    mapping = parse_megatron_table(table["doc"], table["source"]) if table else None
    state, config = convert_megatron(ck, params.get("config_override"), mapping)
    dst = open_location(dest, storage_options)
    specs = [TensorSpec(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in state.items()]
    with SafetensorsWriter(dst, IMPORTED, specs) as writer:
        for name, t in state.items():
            data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            writer.write(name, data)
        record = writer.commit()
    write_json(dst, CONFIG_NAME, config)
    out = record.as_dict()
    out.update(stage=stage, seconds=round(time.perf_counter() - t0, 3), tp=ck.tp_size,
               checkpoint_version=ck.checkpoint_version, source_bytes=sum(f[1] for f in fingerprints))
    return out

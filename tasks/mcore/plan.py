"""Plan a Megatron-Core → Hugging Face conversion from the index alone (pure; `source_checkpoint`
alone stats the files the plan reads).

index + table + config → every HF tensor as a region (`mapping.map_index`) → one `mcore_region`
output tensor each, whose sources are exactly the chunks the region touches (file, byte range,
chunk shape; the chunk's offsets in the global tensor go in the params) → output shards by size
(`planners.by_size`), one shard task each through the engine, journaled like every other stage.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.reader import file_info
from ckptflow.storage.urls import Location
from ckptflow.tasks.mcore.hf_config import hf_config
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor, McoreIndex
from ckptflow.tasks.mcore.mapping import HfTensor, map_index
from ckptflow.tasks.plan.model import OutputTensor, SourceRef, StagePlan
from ckptflow.tasks.plan.transforms import MCORE_REGION
from ckptflow.tasks.planners.by_size import size_shards
from ckptflow.tasks.presets.mcore import McoreTable

STAGE = "megatron-core"


def _touches(ranges: tuple[tuple[int, int], ...], lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


def by_lead(gt: GlobalTensor, n: int) -> dict[tuple[int, ...], list[ChunkRef]]:
    """`gt`'s chunks under each index of its `n` stacked axes: one pass, so planning an HF tensor
    per layer and expert looks at its own few chunks (671B: ~15k experts × their chunks)."""
    out: dict[tuple[int, ...], list[ChunkRef]] = {}
    for c in gt.chunks:
        for lead in itertools.product(*(range(o, o + s) for o, s in zip(c.offsets[:n], c.sizes[:n]))):
            out.setdefault(lead, []).append(c)
    return out


def output_tensor(t: HfTensor, gt: GlobalTensor, chunks: list[ChunkRef]) -> OutputTensor:
    """`t` as an output tensor whose sources are the `chunks` (those at its stacked indices) its rows touch."""
    n = len(t.lead)
    chunks = [c for c in chunks if _touches(t.rows, c.offsets[n], c.offsets[n] + c.sizes[n])]
    sources = tuple(SourceRef(c.file, f"{gt.key}@{','.join(map(str, c.offsets))}", gt.dtype, tuple(c.sizes),
                              c.byte_offset, c.byte_offset + c.byte_length) for c in chunks)
    params = (("key", gt.key), ("lead", tuple(t.lead)), ("rows", tuple(t.rows)),
              ("offsets", tuple(tuple(c.offsets) for c in chunks)))
    return OutputTensor(t.name, t.dtype, t.shape, MCORE_REGION.name, sources, params)


@dataclass(frozen=True)
class McorePlan:
    plan: StagePlan
    config: dict[str, Any]
    table: McoreTable
    tensors: int


def plan_mcore(index: McoreIndex, table: McoreTable, max_shard_size: int,
               override: dict[str, Any] | None = None, tokenizer_vocab: int | None = None) -> McorePlan:
    """The whole conversion's plan; raises a PlanError (naming the key or args) for anything unexpected."""
    config = hf_config(index, table, override, tokenizer_vocab)
    hf = map_index(index, table, config)
    leads: dict[tuple[str, int], dict[tuple[int, ...], list[ChunkRef]]] = {}
    outs = []
    for t in hf:
        gt = index.tensors[t.key]
        if (t.key, len(t.lead)) not in leads:
            leads[t.key, len(t.lead)] = by_lead(gt, len(t.lead))
        outs.append(output_tensor(t, gt, leads[t.key, len(t.lead)].get(tuple(t.lead), [])))
    plan = size_shards(outs, max_shard_size, STAGE, config=config, copy_files=())
    return McorePlan(plan, config, table, len(outs))


def source_checkpoint(index: McoreIndex, plan: StagePlan, loc: Location) -> Checkpoint:
    """What the engine needs of SOURCE: the files the plan reads, with sizes and versions (one
    stat or HEAD each), so a shard's journal key follows them and a file changed mid-run fails its
    shard. No headers: the sources are chunk byte ranges, not safetensors tensors."""
    names = sorted({f for s in plan.shards for f in s.source_files})
    infos = {n: file_info(loc, n) for n in names}
    return Checkpoint(index.root, {n: i["size"] for n, i in infos.items()}, {},
                      versions={n: i["version"] for n, i in infos.items()})


def plan_summary(index: McoreIndex, mp: McorePlan) -> dict[str, Any]:
    """What a dry run and `inspect` show: source format, parallelism, tensors, bytes, shards."""
    plan = mp.plan
    return {
        "source_format": index.format, "iteration": index.iteration, "tp": index.tp, "pp": index.pp, "ep": index.ep,
        "family": mp.table.name or mp.table.model_type, "table": mp.table.label,
        "architectures": list(mp.table.architectures), "source_tensors": len(index.tensors),
        "source_files": len({c.file for g in index.tensors.values() for c in g.chunks}),
        "checkpoint_bytes": sum(c.byte_length for g in index.tensors.values() for c in g.chunks),
        "tensors": mp.tensors, "output_bytes": plan.total_size, "read_bytes": plan.source_bytes,
        "shards": len(plan.shards),
        "shard_files": [{"file": s.file, "tensors": len(s.tensors), "bytes": s.nbytes} for s in plan.shards],
        "vocab_size": mp.config.get("vocab_size"), "tie_word_embeddings": mp.config.get("tie_word_embeddings"),
        "torch_dtype": mp.config.get("torch_dtype"),
    }

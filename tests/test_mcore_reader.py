"""Megatron-Core readers: torch_dist checkpoints (written by torch's own DCP writer, or in its exact
format with chosen chunk layouts) read by range into an index that rebuilds every tensor bit for bit."""
from __future__ import annotations

import random
import warnings
from argparse import Namespace

import numpy as np
import pytest
import torch

from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.assemble import read_region
from ckptflow.tasks.mcore.index import ChunkRef, GlobalTensor
from ckptflow.tasks.mcore.reader import read_mcore_index
from ckptflow.tasks.mcore.regions import chunks_for
from ckptflow.tasks.megatron.safe import MegatronLoadError

from .mcore_dist import grid, write_torch_dist


def _dcp_save(sd: dict, path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=str(path))


def test_torch_dcp_writer_round_trip(tmp_path):
    torch.manual_seed(0)
    sd = {"decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 6, 4).to(torch.bfloat16),
          "embedding.word_embeddings.weight": torch.randn(10, 4), "scalar": torch.tensor(3.5),
          "ids": torch.arange(7), "optimizer.state.exp_avg": torch.zeros(3), "rng_state": torch.zeros(2),
          "decoder.layers.self_attention.linear_proj._extra_state": torch.zeros(9, dtype=torch.uint8)}
    _dcp_save(sd, tmp_path / "iter_0000042")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("42\n")
    index = read_mcore_index(str(tmp_path))
    assert (index.format, index.iteration, index.tp, index.pp, index.ep) == ("torch_dist", 42, 1, 1, 1)
    assert set(index.tensors) == {"decoder.layers.mlp.linear_fc1.weight", "embedding.word_embeddings.weight",
                                  "scalar", "ids"}  # optimizer, RNG and TE's extra state left out
    loc = open_location(index.root)
    for key, t in index.tensors.items():
        assert (t.dtype, t.shape) == ({torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
                                      [sd[key].dtype], tuple(sd[key].shape))
        assert torch.equal(read_region(loc, t), sd[key]), key


def test_sharded_layout_and_common_args(tmp_path):
    torch.manual_seed(1)
    qkv = torch.randn(4, 12, 8).to(torch.bfloat16)     # [L, rows, hidden]: one chunk per layer and TP rank
    experts = torch.randn(2, 4, 6, 8)                  # [L, E, rows, hidden]: experts over EP ranks, TP on rows
    norm = torch.randn(4, 8)
    args = Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                     num_layers=4, params_dtype=torch.bfloat16)
    write_torch_dist(tmp_path / "release", {
        "decoder.layers.self_attention.linear_qkv.weight": (qkv, grid(qkv.shape, (4, 2, 1))),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (experts, grid(experts.shape, (2, 4, 2, 1))),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (norm, grid(norm.shape, (4, 1))),
    }, ranks=3, common={"args": args, "iteration": 5, "checkpoint_version": 3.0})
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    index = read_mcore_index(str(tmp_path))
    assert (index.iteration, index.tp, index.pp, index.ep) == (5, 2, 2, 2)
    assert index.args["params_dtype"] == "torch.bfloat16" and index.args["num_layers"] == 4
    loc = open_location(index.root)
    t = index.tensors["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert len(t.chunks) == 16 and {c.file for c in t.chunks} == {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp"}
    assert torch.equal(read_region(loc, t), experts)
    assert torch.equal(read_region(loc, t, [(1, 2), (2, 3), (1, 5), (0, 8)]), experts[1:2, 2:3, 1:5])
    q = index.tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert torch.equal(read_region(loc, q), qkv)
    assert torch.equal(read_region(loc, q, [(3, 4), (4, 10), (2, 7)]), qkv[3:4, 4:10, 2:7])
    # The iteration folder itself is accepted too.
    assert read_mcore_index(str(tmp_path / "release")).tensors == index.tensors


def _fake_tensor(shape, splits, dtype="F32") -> tuple[GlobalTensor, bytes, np.ndarray]:
    """A global tensor cut on a grid, its chunks laid out in one in-memory 'file' with gaps between."""
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    blob, refs = bytearray(), []
    for offsets, sizes in grid(shape, splits):
        blob += b"\xee" * 13  # bytes that belong to no chunk
        data = np.ascontiguousarray(full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]).tobytes()
        refs.append(ChunkRef("f", len(blob), len(data), offsets, sizes))
        blob += data
    return GlobalTensor("t", dtype, tuple(shape), tuple(refs)), bytes(blob), full


def _build(t: GlobalTensor, blob: bytes, region) -> np.ndarray:
    shape = tuple(b - a for a, b in region)
    out = bytearray(int(np.prod(shape)) * 4)
    for piece in chunks_for(t, region):
        for a, b, d in piece.ranges:
            assert 0 <= d and d + b - a <= len(out)
            out[d:d + b - a] = blob[a:b]
    return np.frombuffer(bytes(out), dtype=np.float32).reshape(shape)


def test_chunks_for_builds_every_region():
    rnd = random.Random(0)
    for shape, splits in [((4, 6, 5), (2, 3, 1)), ((3, 7), (1, 2)), ((9,), (3,)), ((2, 2, 3, 4), (2, 1, 3, 2))]:
        t, blob, full = _fake_tensor(shape, splits)
        for _ in range(60):
            region = []
            for n in shape:
                a = rnd.randrange(n)
                region.append((a, rnd.randrange(a + 1, n + 1)))
            assert np.array_equal(_build(t, blob, region), full[tuple(slice(a, b) for a, b in region)]), region


def test_chunks_for_merges_consecutive_rows():
    t, blob, full = _fake_tensor((4, 6, 5), (4, 2, 1))  # a chunk per (layer, row half): [1, 3, 5]
    pieces = chunks_for(t, [(2, 3), (0, 6), (0, 5)])    # layer 2, all rows: two chunks, one range each
    assert [len(p.ranges) for p in pieces] == [1, 1]
    assert [p.ranges[0][1] - p.ranges[0][0] for p in pieces] == [60, 60]
    pieces = chunks_for(t, [(2, 3), (1, 3), (0, 5)])    # rows 1..2 of layer 2: one run of 2 rows
    assert [(b - a) for p in pieces for a, b, _ in p.ranges] == [40]
    pieces = chunks_for(t, [(2, 3), (1, 3), (1, 4)])    # a column slice: one range per row
    assert [(b - a) for p in pieces for a, b, _ in p.ranges] == [12, 12]
    assert chunks_for(t, [(2, 3), (1, 1), (0, 5)]) == []  # empty region
    with pytest.raises(ValueError, match="not inside shape"):
        chunks_for(t, [(0, 5), (0, 6), (0, 5)])


def test_discovery_errors(tmp_path):
    with pytest.raises(MegatronLoadError, match="not a Megatron-Core checkpoint"):
        read_mcore_index(str(tmp_path))
    for name in ("iter_0000010", "iter_0000020"):
        write_torch_dist(tmp_path / name, {"w": (torch.ones(2), grid((2,), (1,)))})
    with pytest.raises(MegatronLoadError, match="2 iteration folders .*iter_0000010.*pass one of them"):
        read_mcore_index(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("30")
    with pytest.raises(MegatronLoadError, match="names 'iter_0000030' but .* holds no files"):
        read_mcore_index(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("x" * 100)
    with pytest.raises(MegatronLoadError, match="more than 64 bytes"):
        read_mcore_index(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20")
    assert read_mcore_index(str(tmp_path)).iteration == 20
    (tmp_path / "iter_0000020" / ".metadata").unlink()
    with pytest.raises(MegatronLoadError, match=r"\.metadata: missing"):
        read_mcore_index(str(tmp_path))


def test_rank_file_suffix_is_read_from_the_args():
    from ckptflow.tasks.mcore.legacy_layout import rank_files, stage_layers

    names = ["mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_001/model_optim_rng.pt"]
    as_pp = rank_files(names, {"pipeline_model_parallel_size": 2}, "ck")
    as_ep = rank_files(names, {"expert_model_parallel_size": 2}, "ck")
    assert [(r.tp, r.pp, r.ep) for r in as_pp] == [(0, 0, 0), (0, 1, 0)]
    assert [(r.tp, r.pp, r.ep) for r in as_ep] == [(0, 0, 0), (0, 0, 1)]
    with pytest.raises(MegatronLoadError, match="TP=1, PP=1, EP=1.*unexpected: mp_rank_00_000"):
        rank_files(names, {}, "ck")
    with pytest.raises(MegatronLoadError, match="TP=2, PP=2, EP=1.*missing: mp_rank_01_000"):
        rank_files(names, {"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2}, "ck")
    both = [f"mp_rank_0{t}_00{p}_00{e}/model_optim_rng.pt" for t in range(2) for p in range(2) for e in range(2)]
    assert len(rank_files(both, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                 "expert_model_parallel_size": 2}, "ck")) == 8
    assert stage_layers({"num_layers": 4}, 2, "ck") == [0, 2, 4]
    assert stage_layers({"num_layers": 3, "decoder_first_pipeline_num_layers": 1,
                         "decoder_last_pipeline_num_layers": 2}, 2, "ck") == [0, 1, 3]
    assert stage_layers({"num_layers": 7, "decoder_first_pipeline_num_layers": 1}, 4, "ck") == [0, 1, 3, 5, 7]
    with pytest.raises(MegatronLoadError, match="do not split evenly"):
        stage_layers({"num_layers": 5}, 2, "ck")


def test_legacy_keys_become_torch_dist_keys():
    from ckptflow.tasks.mcore.legacy_layout import _global_key

    assert _global_key("decoder.layers.3.input_layernorm.weight")[:3] == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3, None)
    assert _global_key("decoder.layers.0.mlp.experts.local_experts.5.linear_fc2.weight")[:3] == (
        "decoder.layers.mlp.experts.experts.linear_fc2.weight", 0, 5)
    assert _global_key("decoder.layers.1.mlp.experts.linear_fc1.weight7")[:3] == (  # grouped GEMM
        "decoder.layers.mlp.experts.experts.linear_fc1.weight", 1, 7)
    assert _global_key("decoder.layers.3.pre_mlp_layernorm.weight", local_spec=False)[0] == \
        "decoder.layers.pre_mlp_layernorm.weight"  # TransformerEngine's spec keeps this name (MoE)
    assert _global_key("embedding.word_embeddings.weight")[:3] == ("embedding.word_embeddings.weight", None, None)


def test_unmerged_reads_and_far_local_headers(tmp_path, monkeypatch):
    """Every chunk read on its own (no merging) and data/0's local header past the first read (a
    second small read each): the same index, the same bytes."""
    from ckptflow.tasks.mcore import torch_dist

    torch.manual_seed(2)
    w = torch.randn(4, 6, 8)
    root = write_torch_dist(tmp_path / "ck", {"decoder.layers.mlp.linear_fc1.weight": (w, grid(w.shape, (4, 3, 1)))})
    merged = read_mcore_index(str(root))
    monkeypatch.setattr(torch_dist, "MERGE_GAP", -1)
    monkeypatch.setattr(torch_dist, "HEAD", 40)
    calls = []
    real = torch_dist._fetch
    monkeypatch.setattr(torch_dist, "_fetch", lambda *a: calls.append(len(a[2])) or real(*a))
    apart = read_mcore_index(str(root))
    assert apart.tensors == merged.tensors
    assert len(calls) == 4 and sum(calls) == 12 * 2 + 12  # per file: heads + tails, then far headers
    t = apart.tensors["decoder.layers.mlp.linear_fc1.weight"]
    assert torch.equal(read_region(open_location(apart.root), t), w)


def test_no_model_tensors_is_an_error(tmp_path):
    write_torch_dist(tmp_path / "iter_0000003", {"optimizer.state.exp_avg.w": (torch.ones(4), grid((4,), (2,)))})
    with pytest.raises(MegatronLoadError, match="iter_0000003: holds no model tensors"):
        read_mcore_index(str(tmp_path / "iter_0000003"))

"""One pass for dequant (+ fix-dtypes) → MP: byte-identical to the two passes it replaces.

The reference is computed here, by the same planners run as two passes (`plan_passes(...,
fuse=False)`: dequant into an intermediate checkpoint, MP planned again on what was written);
the fused plan must write the very same files, byte for byte, for N ∈ {1, 2, 4}, on ragged
shapes whose rank slices cut through 128×128 scale blocks.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ckptflow.flows.params import Recipe
from ckptflow.flows.recipe import plan_passes
from ckptflow.flows.demo.synthetic import (TOKENIZER_FILES, DeepSeekDims, deepseek_config, deepseek_entries,
                                           write_checkpoint)
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
from ckptflow.tasks.plan.transforms import REGISTRY
from ckptflow.tasks.run.execute import write_shard

from .helpers import engine_convert

# Split by MP (embed/head by rows), casted by --fix-dtypes: float32 where config says bfloat16.
F32_NAMES = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight")


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> dict[bool, Path]:
    """DeepSeek-V3 FP8 (ragged dims): as made (False), and with a few float32 tensors under its
    bfloat16 config (True), which only --fix-dtypes converts."""
    root = tmp_path_factory.mktemp("onepass")
    out = {}
    for f32 in (False, True):
        groups = [[(n, torch.float32, s, (lambda m=m: m().to(torch.float32))) if f32 and n in F32_NAMES
                   else (n, dt, s, m) for n, dt, s, m in group] for group in deepseek_entries(DeepSeekDims())]
        out[f32] = root / f"fp8-{f32}"
        write_checkpoint(open_location(str(out[f32])), groups, deepseek_config(DeepSeekDims()), TOKENIZER_FILES)
    return out


@pytest.mark.parametrize("fix", [False, True], ids=["dequant", "dequant+fix"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_dequant_mp_equals_two_passes(fp8, tmp_path, world, fix, monkeypatch):
    src = fp8[fix]
    recipe = Recipe(dequant=True, fix_dtypes=fix, mp=world)
    two_pass = engine_convert(src, tmp_path / "two", tmp_path / "w2", fuse=False, keep_intermediates=True,
                              **recipe.model_dump())
    assert len(two_pass["passes"]) == 2
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 3000)  # many chunks, rows cut mid-block
    assert len(engine_convert(src, tmp_path / "one", tmp_path / "w1", **recipe.model_dump())["passes"]) == 1
    assert not (tmp_path / "w1" / "stages").exists()  # no intermediate checkpoint: the journal alone
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert sorted(one) == sorted(two) == sorted([f"model{r}-mp{world}.safetensors" for r in range(world)]
                                                + ["config.json", "tokenizer.json", "tokenizer_config.json"])
    for name in two:
        assert one[name] == two[name], name
    if not fix:  # and what seed 001 makes of the dequantized intermediate (seed 000's output)
        from bench.seed001 import seed_rank_state_dicts
        from safetensors import safe_open

        want = seed_rank_state_dicts(str(tmp_path / "w2" / "stages" / "dequant"), world)
        for r in range(world):
            with safe_open(str(tmp_path / "one" / f"model{r}-mp{world}.safetensors"), "pt") as f:
                assert sorted(f.keys()) == sorted(want[r])
                assert all(torch.equal(f.get_tensor(n).view(torch.uint8), t.contiguous().view(torch.uint8))
                           for n, t in want[r].items())
    plan = plan_passes(scan_checkpoint(open_location(str(src))), recipe)[0][0].plan
    kinds = {(t.transform, t.param("cut") is not None) for s in plan.shards for t in s.tensors}
    if world > 1:  # the fused plan really cuts dequantized (and cast) tensors
        assert ("dequant_fp8", True) in kinds and (("cast", True) in kinds) == fix
    if fix:
        from safetensors import safe_open

        with safe_open(str(tmp_path / "one" / f"model0-mp{world}.safetensors"), "pt") as f:
            assert f.get_tensor("embed.weight").dtype == torch.bfloat16


def _fp8_tensor(tmp_path: Path, shape: tuple[int, ...], block: tuple[int, int]) -> tuple[OutputTensor, Path]:
    """A lone FP8 weight + scale on disk and the plan's whole-tensor dequant of it."""
    from ckptflow.storage.safetensors_format import TensorSpec
    from ckptflow.storage.writer import SafetensorsWriter

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    sshape = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    s = torch.rand(sshape, generator=g) * 1e-2 + 1e-4
    loc = open_location(str(tmp_path / "src"))
    specs = [TensorSpec("w", "F8_E4M3", shape), TensorSpec("w_scale_inv", "F32", sshape)]
    with SafetensorsWriter(loc, "a.safetensors", specs) as wr:
        wr.write("w", memoryview(w.view(torch.uint8).numpy()).cast("B"))
        wr.write("w_scale_inv", memoryview(s.view(torch.uint8).numpy().reshape(-1)).cast("B"))
        wr.commit()
    h = scan_checkpoint(loc).headers["a.safetensors"].tensors
    srcs = (SourceRef.of("a.safetensors", h["w"]), SourceRef.of("a.safetensors", h["w_scale_inv"]))
    return OutputTensor("w", "BF16", shape, "dequant_fp8", srcs, (("block", block),)), tmp_path / "src"


@pytest.mark.parametrize("path", ["blocks", "stream"])
def test_every_cut_of_a_dequantized_tensor_is_the_slice_of_the_whole(tmp_path, monkeypatch, path):
    """Cuts along each dim of a stacked [3, 200, 300] FP8 tensor (blocks 64×128, ragged): whole-
    block dequant then cut (`blocks`) and the generic cut of the full stream (`stream`, what an
    unknown transform gets) both equal slicing the dequantized whole."""
    from safetensors import safe_open

    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 5000)
    if path == "stream":
        entry = REGISTRY["dequant_fp8"]  # as if it could not cut itself: the executor cuts its whole stream
        monkeypatch.setitem(REGISTRY, "dequant_fp8", dataclasses.replace(entry, cuts_itself=False))
    whole, src = _fp8_tensor(tmp_path, (3, 200, 300), (64, 128))
    tensors = [whole]
    cuts = [(0, 1, 3), (1, 0, 50), (1, 70, 200), (1, 64, 128), (2, 0, 150), (2, 130, 260), (2, 256, 300)]
    for k, (dim, a, b) in enumerate(cuts):
        shape = tuple(b - a if d == dim else n for d, n in enumerate(whole.shape))
        tensors.append(OutputTensor(f"cut{k}", "BF16", shape, "dequant_fp8", whole.sources,
                                    whole.params + (("cut", (dim, a, b)), ("full_shape", whole.shape))))
    write_shard(ShardPlan("out.safetensors", tuple(tensors)), open_location(str(src)),
                open_location(str(tmp_path / "dst")))
    with safe_open(str(tmp_path / "dst" / "out.safetensors"), "pt") as f:
        full = f.get_tensor("w")
        for k, (dim, a, b) in enumerate(cuts):
            want = full.narrow(dim, a, b - a).contiguous()
            assert torch.equal(f.get_tensor(f"cut{k}").view(torch.int16), want.view(torch.int16)), cuts[k]


@pytest.mark.parametrize("transform", ["dequant_fp8", "copy"])
def test_a_column_cut_reads_only_its_columns(tmp_path, monkeypatch, transform):
    """An MP rank's slice of a ROW-split tensor (o_proj, down_proj: dim 1) costs its own bytes of
    each row, not the whole rows: 1/8 of the tensor for --mp 8, from the page cache or the disk."""
    import os

    from safetensors import safe_open

    whole, src = _fp8_tensor(tmp_path, (512, 2048), (128, 128))
    cut = (1, 768, 1024)  # rank 3 of 8
    tensor = OutputTensor("w", "BF16", (512, 256), "dequant_fp8", whole.sources,
                          whole.params + (("cut", cut), ("full_shape", whole.shape)))
    if transform == "copy":  # the raw FP8 codes, as an MP pass of an FP8 checkpoint copies them
        tensor = OutputTensor("w", "F8_E4M3", (512, 256), "copy", whole.sources[:1], (("cut", cut),))
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 64 << 10)  # several chunks of whole rows
    read = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: read.append(sum(map(len, bufs))) or real(fd, bufs, at))
    shard = ShardPlan("out.safetensors", (tensor,))
    write_shard(shard, open_location(str(src)), open_location(str(tmp_path / "d")))
    scale_bytes = 4 * 4 * 16
    assert 512 * 256 <= sum(read) <= 512 * 256 + scale_bytes, sum(read)  # the whole tensor is 1 MiB
    assert shard.source_bytes == sum(read)  # what runs and dry runs report as read is what was read
    with safe_open(str(tmp_path / "d" / "out.safetensors"), "pt") as g:
        got = g.get_tensor("w")
    with safe_open(str(src / "a.safetensors"), "pt") as f:
        if transform == "copy":
            assert torch.equal(got.view(torch.uint8), f.get_tensor("w")[:, 768:1024].contiguous().view(torch.uint8))
        else:
            from ckptflow.tasks.kernels.fp8_cpu import torch_weight_dequant

            want = torch_weight_dequant(f.get_tensor("w"), f.get_tensor("w_scale_inv"), (128, 128))[:, 768:1024]
            assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16))


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("lo, hi", [(0, 16), (40, 64), (8, 64)])  # narrow (a read per row) and wide
def test_read_columns_is_the_numpy_column_slice(tmp_path, where, lo, hi):
    import numpy as np

    from ckptflow.storage.reader import RangeReader

    data = np.random.default_rng(0).integers(0, 256, 10 * 64 + 30, dtype=np.uint8)
    loc = open_location(str(tmp_path) if where == "local" else f"memory://cols-{lo}-{hi}")
    loc.fs.pipe_file(loc.path("f.bin"), data.tobytes())
    want = data[30:].reshape(10, 64)[:, lo:hi].tobytes()
    with RangeReader(loc) as reader:
        assert bytes(reader.read_columns("f.bin", 30, 30 + 640, 64, lo, hi)) == want
        out = bytearray(len(want) + 7)  # a pooled buffer may be larger than asked
        assert bytes(reader.read_columns("f.bin", 30, 30 + 640, 64, lo, hi, out=out)) == want


def test_a_local_file_cut_short_since_validation_is_one_error_naming_it(tmp_path):
    from ckptflow.storage.reader import RangeReader
    from ckptflow.storage.urls import StorageError

    (tmp_path / "f.bin").write_bytes(bytes(100))  # validated at 640 + 30 bytes, now 100
    with RangeReader(open_location(str(tmp_path))) as reader:
        with pytest.raises(StorageError, match=r"f\.bin: wanted bytes up to 120 but the file ends at 100; it changed"):
            reader.read("f.bin", 30, 120)
        with pytest.raises(StorageError, match=r"f\.bin: wanted bytes up to 110 but the file ends at 100; it changed"):
            reader.read_columns("f.bin", 30, 30 + 640, 64, 8, 16)  # row 1's slice is [102, 110)

"""The readers against real megatron-core 0.16.1 saves (tests/data/mcore/, made by its generate.py):
every global tensor assembled from the index equals reference_state.safetensors (torch's own DCP
reader of the torch_dist save) bit for bit, in both formats, and both formats give one index."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.assemble import read_region
from ckptflow.tasks.mcore.reader import read_mcore_index

DATA = Path(__file__).parent / "data" / "mcore"
FIXTURES = sorted(p.parent.name for p in DATA.glob("*/reference_state.safetensors"))
SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Saves the index cannot express, refused with one line naming the first such tensor.
REFUSED = {("mixtral-ep2-groupedmlp-bf16", "legacy"): "'decoder.layers.0.mlp.experts.weight1': a GroupedMLP weight"}


def _formats(name: str) -> list[str]:
    return [f for f in ("torch_dist", "legacy") if (DATA / name / f).is_dir() and (name, f) not in REFUSED]


@pytest.mark.parametrize("name, fmt", sorted(REFUSED))
def test_refused_layouts(name, fmt):
    from ckptflow.tasks.megatron.safe import MegatronLoadError

    with pytest.raises(MegatronLoadError) as err:
        read_mcore_index(str(DATA / name / fmt))
    assert REFUSED[(name, fmt)] in str(err.value) and str(DATA / name / fmt) in str(err.value)
    assert "\n" not in str(err.value)


def test_fixtures_are_there():
    assert len(FIXTURES) >= 5, f"expected the megatron-core fixtures under {DATA}"


@pytest.mark.parametrize("name", FIXTURES)
def test_every_tensor_equals_the_reference(name):
    ref = load_file(DATA / name / "reference_state.safetensors")
    layouts = {}
    for fmt in _formats(name):
        index = read_mcore_index(str(DATA / name / fmt))
        assert index.format == fmt and index.iteration == 1
        assert set(index.tensors) == set(ref), (fmt, set(index.tensors) ^ set(ref))
        loc = open_location(index.root)
        for key, t in index.tensors.items():
            assert (t.dtype, t.shape) == (SAFETENSORS[ref[key].dtype], tuple(ref[key].shape)), (fmt, key)
            assert torch.equal(read_region(loc, t), ref[key]), (fmt, key)
        layouts[fmt] = (sorted((k, t.dtype, t.shape) for k, t in index.tensors.items()),
                        (index.tp, index.pp, index.ep), index.args)
        assert index.args["num_layers"] >= 2 and index.args["tensor_model_parallel_size"] == index.tp
    first = next(iter(layouts.values()))
    assert all(v == first for v in layouts.values())  # torch_dist and legacy agree


@pytest.mark.parametrize("name", FIXTURES)
def test_blocks_of_stacked_tensors(name):
    """Layer i, a row range of a stacked weight: what a mapping reads per output tensor."""
    ref = load_file(DATA / name / "reference_state.safetensors")
    for fmt in _formats(name):
        index = read_mcore_index(str(DATA / name / fmt))
        loc = open_location(index.root)
        for key in ("decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.mlp.linear_fc1.weight",
                    "decoder.layers.mlp.experts.experts.linear_fc1.weight"):
            if key not in index.tensors:
                continue
            t = index.tensors[key]
            last = t.shape[0] - 1
            region = [(last, last + 1)] + [(0, n) for n in t.shape[1:]]
            region[-2] = (1, t.shape[-2] - 1)
            want = ref[key][tuple(slice(a, b) for a, b in region)]
            assert torch.equal(read_region(loc, t, region), want), (fmt, key)


@pytest.mark.parametrize("fmt", ["torch_dist", "legacy"])
def test_remote_location_gives_the_same_index(fmt):
    """Through fsspec (memory://, as s3:// would): same chunks, same bytes; paths relative to the root."""
    import fsspec

    name = next((n for n in FIXTURES if fmt in _formats(n) and "tp2" in n), None)
    assert name is not None
    fs = fsspec.filesystem("memory")
    src = DATA / name / fmt
    for path in src.rglob("*"):
        if path.is_file():
            fs.pipe(f"/mcore-test/{name}/{fmt}/{path.relative_to(src)}", path.read_bytes())
    try:
        remote = read_mcore_index(f"memory://mcore-test/{name}/{fmt}")
        local = read_mcore_index(str(src))
        assert remote.tensors == local.tensors and remote.args == local.args
        ref = load_file(DATA / name / "reference_state.safetensors")
        loc = open_location(remote.root)
        for key, t in remote.tensors.items():
            assert torch.equal(read_region(loc, t), ref[key]), key
    finally:
        fs.rm(f"/mcore-test/{name}", recursive=True)

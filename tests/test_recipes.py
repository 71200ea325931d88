"""Stages chained in one flow: dequant → MP and dequant → reindex in one pass, planning errors before any write."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ckptflow.storage.errors import UserError

from .helpers import dequant_reference, engine_convert


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out

def test_dequant_then_mp_matches_dequant_alone_sliced(demo_ckpt, tmp_path):
    bf16 = tmp_path / "bf16"
    dequant_reference(demo_ckpt, bf16, tmp_path / "w1")  # the reference, on the engine
    ref = tensors(bf16)
    out = tmp_path / "mp"
    summary = engine_convert(str(demo_ckpt), str(out), mp=2, work=str(tmp_path / "w2"),
                           dequant=True)
    assert summary["stage"] == "dequant+mp" and summary["cached_shards"] == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model0-mp2.safetensors", "model1-mp2.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]  # no index, no generation_config
    ranks = [tensors(out / f"model{r}-mp2.safetensors") for r in range(2)]
    assert torch.equal(torch.cat([r["embed.weight"] for r in ranks]), ref["model.embed_tokens.weight"])
    assert torch.equal(torch.cat([r["layers.0.attn.wq_b.weight"] for r in ranks]),
                       ref["model.layers.0.self_attn.q_b_proj.weight"])
    assert torch.equal(torch.cat([r["layers.1.attn.wo.weight"] for r in ranks], dim=1),
                       ref["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(ranks[1]["layers.2.ffn.experts.5.w2.weight"],
                       ref["model.layers.2.mlp.experts.5.down_proj.weight"])
    assert "layers.2.ffn.experts.5.w2.weight" not in ranks[0]
    assert ranks[0]["layers.1.ffn.gate.bias"].dtype == torch.float32
    assert not any(k.startswith("layers.3.") for r in ranks for k in r)  # the MTP layer is gone
    assert not any(k.endswith(".scale") for r in ranks for k in r)

    # One pass: the work location holds records (journal, Prefect results), no tensor file.
    work = tmp_path / "w2"
    assert not (work / "stages").exists()
    assert not [p for p in work.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert {p.relative_to(work).parts[0] for p in work.rglob("*") if p.is_file()} <= {"journal", "results"}
    again = engine_convert(str(demo_ckpt), str(out), mp=2, work=str(tmp_path / "w2"), dequant=True)
    assert again["cached_shards"] == again["shards"] == 2  # the 2 rank files, nothing in between

def test_mp_errors_fire_before_any_output(demo_ckpt, tmp_path):
    out = tmp_path / "mp3"
    with pytest.raises(UserError, match="3"):
        engine_convert(str(demo_ckpt), str(out), mp=3, work=str(tmp_path / "w"), dequant=True)
    assert not out.exists()
    assert not (tmp_path / "w" / "stages").exists()  # not even the dequant pass started


def test_dequant_and_reindex_compose_into_one_pass(demo_ckpt, tmp_path):
    bf16 = tmp_path / "bf16"
    dequant_reference(demo_ckpt, bf16, tmp_path / "w1")  # the reference, on the engine
    out = tmp_path / "reindexed"
    summary = engine_convert(str(demo_ckpt), str(out), reindex=True, max_shard_size="1MB", work=str(tmp_path / "w2"),
                           dequant=True)
    assert summary["stage"] == "dequant+reindex"
    assert not (tmp_path / "w2" / "stages").exists()  # one pass: no intermediate checkpoint
    got, ref = tensors(out), tensors(bf16)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)
    import json

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for layer in range(4):
        p = f"model.layers.{layer}.self_attn."
        files = {weight_map[p + x] for x in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight")}
        assert len(files) == 1, files  # the MLA pair shares a file
        for e in range(8):
            q = f"model.layers.{layer}.mlp.experts.{e}."
            if q + "gate_proj.weight" in weight_map:
                assert weight_map[q + "gate_proj.weight"] == weight_map[q + "up_proj.weight"]

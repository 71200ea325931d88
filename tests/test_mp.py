"""MP sharding: presets as tables, the planner's up-front errors, and rank files equal to what
DeepSeek-V3's inference/convert.py (seed 001) would write — checked against an independent,
in-memory re-expression of that script's algorithm, not against the planner's own table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.seed001 import is_routed_expert, seed_rank_state_dicts, seed_rename  # the seed, re-expressed
from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.files import write_json
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.planners.mp import plan_mp
from ckptflow.tasks.presets.mp import Split, load_preset, map_name, parse_preset
from ckptflow.tasks.plan.model import PlanError
from .helpers import fake_ckpt, make_llama

# Every split dim here divides by 4 and, for FP8 weights, gives each rank whole 128-row blocks.
ALIGNED = DeepSeekDims(intermediate_size=512, moe_intermediate_size=512, num_attention_heads=16,
                       qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)

def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every source tensor but the MTP layers (the seed's `model.layers.61`, i.e. index
    num_hidden_layers onwards), loaded whole."""
    config = json.loads((src / "config.json").read_text())
    first = config["num_hidden_layers"]
    mtp = tuple(f"model.layers.{first + k}." for k in range(config.get("num_nextn_predict_layers", 0)))
    out = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if not n.startswith(mtp)})
    return out


def seed_reference(src: Path, world: int) -> list[dict[str, torch.Tensor]]:
    return seed_rank_state_dicts(str(src), world)


# ---- helpers
def convert(src: Path, dst: Path, world: int, preset: str = "deepseek-v3", **kw):
    plan = plan_mp(scan_checkpoint(open_location(str(src))), world, preset, **kw)  # raises before any write
    for shard in plan.shards:
        write_shard(shard, open_location(str(src)), open_location(str(dst)))
    return plan


def read_ranks(dst: Path, world: int) -> list[dict[str, torch.Tensor]]:
    assert sorted(p.name for p in dst.iterdir()) == sorted(f"model{r}-mp{world}.safetensors" for r in range(world))
    out = []
    for r in range(world):
        with safe_open(str(dst / f"model{r}-mp{world}.safetensors"), "pt") as f:
            out.append({n: f.get_tensor(n) for n in f.keys()})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mp")
    fp8 = root / "fp8"
    make_deepseek_v3_fp8(open_location(str(fp8)), ALIGNED)
    # BF16 variant: the default (unaligned, ragged) dims, dequantized by the dequant stage.
    raw, bf16 = root / "fp8-default", root / "bf16"
    make_deepseek_v3_fp8(open_location(str(raw)), DeepSeekDims())
    plan = plan_dequant(scan_checkpoint(open_location(str(raw))))
    for shard in plan.shards:
        write_shard(shard, open_location(str(raw)), open_location(str(bf16)))
    write_json(open_location(str(bf16)), "config.json", plan.config)
    return {"fp8": fp8, "bf16": bf16, "fp8-default": raw}


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_files_equal_seed_semantics(ckpts, tmp_path, kind, world):
    src, dst = ckpts[kind], tmp_path / "out"
    plan = convert(src, dst, world)
    got, want = read_ranks(dst, world), seed_reference(src, world)
    for r in range(world):
        assert sorted(got[r]) == sorted(want[r]), f"rank {r}"
        for name, t in want[r].items():
            assert same_bytes(got[r][name], t), (r, name)
    # The MTP layer (index num_hidden_layers) is gone, and counted as dropped.
    mtp = f"layers.{DeepSeekDims().num_hidden_layers}."
    assert not any(n.startswith(mtp) for rank in got for n in rank)
    assert plan.dropped and all(n.startswith("model." + mtp) for n in plan.dropped)
    # Rank files put back together give every renamed source tensor exactly.
    for name, param in source_tensors(src).items():
        new, dim = seed_rename(name)
        holders = [rank[new] for rank in got if new in rank]
        if is_routed_expert(new):
            assert len(holders) == 1 and same_bytes(holders[0], param), new
        elif dim is None:
            assert len(holders) == world and all(same_bytes(h, param) for h in holders), new
        else:
            assert same_bytes(torch.cat(holders, dim), param), new
    if kind == "fp8":
        assert got[0]["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
        assert got[0]["layers.1.attn.wq_b.scale"].shape[0] * 128 == got[0]["layers.1.attn.wq_b.weight"].shape[0]


def test_plan_shape_names_and_options(ckpts):
    ckpt = scan_checkpoint(open_location(str(ckpts["fp8"])))
    plan = plan_mp(ckpt, 4, "deepseek-v3")
    assert (plan.stage, plan.write_index, plan.config) == ("mp", False, None)
    assert plan.copy_files == ("*token*", "config.json")
    assert [s.file for s in plan.shards] == [f"model{r}-mp4.safetensors" for r in range(4)]
    t = {o.name: o for o in plan.shards[2].tensors}
    assert (t["layers.1.attn.wq_b.weight"].transform, t["layers.1.attn.wq_b.weight"].params) == \
        ("slice", (("dim", 0), ("start", 512), ("stop", 768)))
    assert t["layers.1.attn.wo.scale"].params == (("dim", 1), ("start", 2), ("stop", 3))
    assert t["layers.1.ffn.gate.bias"].transform == "copy"
    assert {n for n in t if ".experts." in n and n.endswith(".w1.weight")} == \
        {f"layers.{i}.ffn.experts.{e}.w1.weight" for i in (1, 2) for e in (4, 5)}
    assert plan_mp(ckpt, 4, "deepseek-v3") == plan  # deterministic


@pytest.mark.parametrize("world", [2, 4])
def test_unaligned_fp8_splits_fail_before_any_write(ckpts, tmp_path, world):
    """Default dims: hidden 200, q_b_proj 192 rows, MLP 300 wide. The seed would split the
    scales anyway (or assert after loading the whole model); the planner refuses up front."""
    dst = tmp_path / "out"
    with pytest.raises(PlanError) as err:
        convert(ckpts["fp8-default"], dst, world)
    msg = str(err.value)
    assert not dst.exists()
    assert "nothing was written" in msg
    assert "'layers.0.ffn.w1.scale' (from 'model.layers.0.mlp.gate_proj.weight_scale_inv'" in msg
    assert f"split along dim 0 of size 3 (shape [3, 2]) is not divisible by N={world}" in msg
    if world == 2:  # 192 / 2 = 96 rows: divisible, but not whole 128-row blocks
        assert "'layers.0.attn.wq_b.weight'" in msg and "gives each rank 96 of 192" in msg


def test_every_problem_reported_at_once(ckpts, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(PlanError) as err:
        convert(ckpts["fp8"], dst, 3)
    msg = str(err.value)
    assert not dst.exists()
    assert "n_routed_experts=8 routed experts cannot be split evenly over 3 ranks" in msg
    assert "'embed.weight' (from 'model.embed_tokens.weight'" in msg and "size 1000" in msg
    assert msg.count("is not divisible by N=3") > 10


DS_CONFIG = {"num_hidden_layers": 1, "num_nextn_predict_layers": 1, "n_routed_experts": 2}


def test_unmatched_names_listed_or_dropped_with_warning():
    ckpt = fake_ckpt({"a.safetensors": [
        ("model.layers.0.input_layernorm.weight", "BF16", (8,)), ("model.layers.0.mystery.weight", "BF16", (8,)),
        ("vision_tower.proj.weight", "BF16", (8, 8)), ("model.layers.1.enorm.weight", "BF16", (8,))]},
        config=DS_CONFIG)
    with pytest.raises(PlanError) as err:
        plan_mp(ckpt, 2, "deepseek-v3")
    msg = str(err.value)
    assert "2 tensor name(s) match no row" in msg and "--drop-unmatched" in msg
    assert "model.layers.0.mystery.weight" in msg and "vision_tower.proj.weight" in msg
    assert "enorm" not in msg  # the MTP layer is dropped before the table is consulted
    plan = plan_mp(ckpt, 2, "deepseek-v3", drop_unmatched=True)
    assert plan.warnings == ("--drop-unmatched: 2 tensor(s) match no row of preset 'deepseek-v3' and are "
                             "not written (each is listed under 'dropped')",)
    assert plan.dropped_unmatched == ("model.layers.0.mystery.weight", "vision_tower.proj.weight")
    assert set(plan.dropped) == {"model.layers.0.mystery.weight", "vision_tower.proj.weight",
                                 "model.layers.1.enorm.weight"}
    assert [[t.name for t in s.tensors] for s in plan.shards] == [["layers.0.attn_norm.weight"]] * 2


def test_layers_outside_config_and_missing_config_keys():
    ckpt = fake_ckpt({"a.safetensors": [("model.layers.3.input_layernorm.weight", "BF16", (8,))]},
                     config=DS_CONFIG)
    with pytest.raises(PlanError, match="tensors exist in layer 3, but config.json says num_hidden_layers=1"):
        plan_mp(ckpt, 1, "deepseek-v3")
    experts = fake_ckpt({"a.safetensors": [("model.layers.0.mlp.experts.0.up_proj.weight", "BF16", (8, 8))]},
                        config={"num_hidden_layers": 1})
    with pytest.raises(PlanError, match="n_routed_experts is None; partitioning experts"):
        plan_mp(experts, 1, "deepseek-v3")
    with pytest.raises(PlanError, match="num_hidden_layers is None"):
        plan_mp(fake_ckpt({"a.safetensors": [("model.layers.0.input_layernorm.weight", "BF16", (8,))]}),
                1, "deepseek-v3")
    with pytest.raises(PlanError, match="world size must be a positive integer"):
        plan_mp(ckpt, 0, "deepseek-v3")


def test_table_first_match_wins_null_drops_and_scale_must_follow_weight():
    preset = parse_preset({"rules": [["a.{layer}.special.weight", "s{layer}", "REPLICATED"],
                                     ["a.{layer}.{expert}.weight", "x.{layer}.{expert}", "EXPERT"],
                                     ["a.{layer}.{expert}.weight_scale_inv", "x.{layer}.{expert}.s", "COLUMN"],
                                     ["a.{layer}.special.bias", None]],
                           "experts": "n"}, "inline")
    assert map_name(preset, "a.1.special.weight").target == "s1"
    m = map_name(preset, "a.1.7.weight")
    assert (m.target, m.rule.split, m.captures) == ("x.1.7", Split.EXPERT, {"layer": "1", "expert": "7"})
    assert map_name(preset, "a.1.special.bias").target is None
    assert map_name(preset, "a.1.special.weightX") is None  # whole-name matches only
    ckpt = fake_ckpt({"f.safetensors": [("a.0.1.weight", "F8_E4M3", (256, 128)),
                                        ("a.0.1.weight_scale_inv", "F32", (2, 1)),
                                        ("a.0.special.bias", "BF16", (4,))]}, config={"n": 2})
    with pytest.raises(PlanError, match="split COLUMN but its weight 'x.0.1' .* is split EXPERT"):
        plan_mp(ckpt, 2, preset)


def test_load_preset_errors_name_the_file(tmp_path):
    assert load_preset("llama").name == "llama" and len(load_preset("deepseek-v3").rules) > 30
    bad = tmp_path / "bad.json"
    cases = {"{not json": "is not valid JSON",
             '{"rules": [["x.{layer}", "y", "SIDEWAYS"]]}': "split must be one of COLUMN, ROW, REPLICATED, EXPERT",
             '{"rules": [["x.{layer}", "y.{expert}", "ROW"]]}': "uses a placeholder its pattern does not capture",
             '{"rules": [["x.{layer}", "y", "ROW"]], "typo": 1}': "unknown key",
             '{"rules": [["x", "y", "ROW"]], "output_file": "m.safetensors"}':
                 "must end in .safetensors, contain {rank}"}
    for text, why in cases.items():
        bad.write_text(text)
        with pytest.raises(PlanError, match=re.escape(f"preset {bad}: ") + ".*" + re.escape(why)):
            load_preset(bad)
    with pytest.raises(PlanError, match="no such built-in preset"):
        load_preset(tmp_path / "missing.json")


def test_llama_preset_round_trips(tmp_path):
    src = make_llama(tmp_path / "llama")
    plan = convert(tmp_path / "llama", tmp_path / "out", 2, "llama")
    assert plan.dropped == ("model.layers.0.self_attn.rotary_emb.inv_freq",)
    got = read_ranks(tmp_path / "out", 2)
    row = ("o_proj.weight", "down_proj.weight")
    replicated = ("norm.weight", "layernorm.weight")
    for name, t in src.items():
        if name.endswith(replicated):
            assert same_bytes(got[0][name], t) and same_bytes(got[1][name], t), name
        else:
            dim = 1 if name.endswith(row) else 0
            assert got[0][name].shape[dim] * 2 == t.shape[dim], name
            assert same_bytes(torch.cat([got[0][name], got[1][name]], dim), t), name
    assert sorted(got[0]) == sorted(got[1]) == sorted(src)


def test_small_read_chunks_give_the_same_rank_files(ckpts, tmp_path, monkeypatch):
    """ROW splits of FP8 weights and scales read a few outer rows per chunk: same bytes."""
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 1000)
    convert(ckpts["fp8"], tmp_path / "out", 4)
    got, want = read_ranks(tmp_path / "out", 4), seed_reference(ckpts["fp8"], 4)
    for r in range(4):
        assert sorted(got[r]) == sorted(want[r])
        assert all(same_bytes(got[r][n], t) for n, t in want[r].items())

"""Megatron-Core → HF mapping, planning and assembly on hand-made torch_dist layouts (real bytes).

The megatron-core fixtures (tests/data/mcore, test_mcore_fixtures.py) check the same path against
Megatron's own saves and logits; these pin the table ops and the assembler on layouts built here
from an HF model, so a failure names the op.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.ops import halves_rows, qkv_rows
from ckptflow.tasks.mcore.plan import plan_mcore, source_checkpoint
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.presets.mcore import load_mcore_table, parse_mcore_table, pick_table
from ckptflow.tasks.run.engine import EnginePass, run_conversion

from .mcore_handmade import llama_args, mcore_globals, write_mcore


def test_qkv_rows_groups_q_heads_then_k_then_v():
    # 4 query heads in 2 groups, head_dim 2: rows are [q0 q1 k0 v0 | q2 q3 k1 v1], 2 rows each
    q, k, v = qkv_rows(16, heads=4, groups=2, head_dim=2, key="k")
    assert q == ((0, 4), (8, 12)) and k == ((4, 6), (12, 14)) and v == ((6, 8), (14, 16))
    # MHA (a group per head) and MQA (one group)
    assert qkv_rows(6, 1, 1, 2, "k") == (((0, 2),), ((2, 4),), ((4, 6),))
    assert qkv_rows(12, 4, 1, 2, "k")[0] == ((0, 8),)
    with pytest.raises(PlanError, match="k: 14 fused QKV rows"):
        qkv_rows(14, 4, 2, 2, "k")
    with pytest.raises(PlanError, match="not a multiple"):
        qkv_rows(16, 4, 3, 2, "k")
    assert halves_rows(6, "fc1") == (((0, 3),), ((3, 6),))
    with pytest.raises(PlanError, match="cannot be halved"):
        halves_rows(5, "fc1")


def test_family_detection_and_table_errors():
    assert pick_table({"num_experts": 8, "qk_layernorm": True}).model_type == "qwen3_moe"
    assert pick_table({"num_experts": 8}).model_type == "mixtral"
    assert pick_table({"qk_layernorm": True}).model_type == "qwen3"
    assert pick_table({"add_qkv_bias": True}).model_type == "qwen2"
    assert pick_table({}).model_type == "llama"
    assert pick_table({}, family="qwen3").model_type == "qwen3"
    with pytest.raises(PlanError, match="--family nope: not a built-in"):
        pick_table({}, family="nope")
    doc = json.loads(json.dumps(load_mcore_table("llama").model_dump(mode="json")))
    doc["rules"][0]["split"] = "qkv"
    with pytest.raises(PlanError, match=r"rules\[0\].*split qkv needs 'targets'"):
        parse_mcore_table(doc, "mine.json")


def _hf_model(arch: str, **over):
    import transformers

    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
                          "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}[arch]
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval()


def _convert(tmp_path, index, table=None, **kw):
    table = table or pick_table(index.args)
    mp = plan_mcore(index, table, kw.pop("max_shard_size", 10**9), **kw)
    src, dst = open_location(index.root), open_location(str(tmp_path / "hf"))
    ckpt = source_checkpoint(index, mp.plan, src)
    run_conversion(ckpt, [EnginePass(mp.plan)], src, dst, str(tmp_path / "work"))
    return mp, tmp_path / "hf"


def _load(path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_gqa_tp2_round_trip(tmp_path, dtype):
    ref = _hf_model("llama").to(dtype)
    sd = ref.state_dict()
    g = mcore_globals(sd, ref.config, padded_vocab=128)
    index = write_mcore(tmp_path / "src", g, llama_args(ref.config, 128, 97), tp=2)
    mp, out = _convert(tmp_path, index, max_shard_size=20_000)
    assert len(mp.plan.shards) > 1 and mp.config["model_type"] == "llama"
    model, info = _load(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    got = model.state_dict()
    for name, t in sd.items():
        assert got[name].dtype == dtype and torch.equal(got[name], t), name  # bit for bit
    ids = torch.tensor([[1, 5, 9, 96, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_tied_and_vocab_sources(tmp_path):
    ref = _hf_model("llama", tie_word_embeddings=True)
    g = mcore_globals(ref.state_dict(), ref.config, padded_vocab=128)
    assert "output_layer.weight" not in g
    args = llama_args(ref.config, 128, None)
    index = write_mcore(tmp_path / "src", g, args, tp=1)
    table = pick_table(args)
    with pytest.raises(PlanError, match="true vocabulary size is unknown.*--tokenizer DIR.*--config FILE"):
        plan_mcore(index, table, 10**9)
    mp, out = _convert(tmp_path, index, tokenizer_vocab=97)
    names = [t.name for s in mp.plan.shards for t in s.tensors]
    assert "lm_head.weight" not in names and mp.config["tie_word_embeddings"] is True
    emb = next(t for s in mp.plan.shards for t in s.tensors if t.name == "model.embed_tokens.weight")
    assert emb.shape == (97, 32)  # padded rows never planned, never read
    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 2, 96]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _hub_state(model, tmp_path) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hub names (transformers 5 fuses experts in memory only)."""
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "ref")
    return load_file(tmp_path / "ref" / "model.safetensors")


MIXTRAL_NAMES = {".block_sparse_moe.gate.": ".mlp.gate.", ".block_sparse_moe.experts.": ".mlp.experts.",
                 ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_round_trip(tmp_path, arch):
    moe = {"num_experts": 4, "moe_intermediate_size": 16, "decoder_sparse_step": 1, "norm_topk_prob": True} \
        if arch == "qwen3_moe" else {"num_local_experts": 4, "intermediate_size": 16}
    ref = _hf_model(arch, **moe, num_experts_per_tok=2)
    hub = _hub_state(ref, tmp_path)
    for old, new in MIXTRAL_NAMES.items():  # the layout helper speaks Qwen's names
        hub = {k.replace(old, new): v for k, v in hub.items()}
    cfg = ref.config
    if arch == "mixtral":
        cfg.num_experts = cfg.num_local_experts
    g = mcore_globals(hub, cfg, padded_vocab=100, moe=True, qk_norm=arch == "qwen3_moe")
    args = llama_args(ref.config, 100, 97, num_experts=4, qk_layernorm=arch == "qwen3_moe", moe_router_topk=2,
                      moe_ffn_hidden_size=16, moe_router_pre_softmax=False)
    index = write_mcore(tmp_path / "src", g, args, tp=2)
    mp, out = _convert(tmp_path, index)
    assert mp.config["model_type"] == arch
    model, info = _load(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.tensor([[1, 5, 9, 96, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_qwen2_qkv_bias_round_trip(tmp_path):
    ref = _hf_model("qwen2")
    sd = ref.state_dict()
    g = mcore_globals(sd, ref.config, padded_vocab=128, bias=True)
    index = write_mcore(tmp_path / "src", g, llama_args(ref.config, 128, 97, add_qkv_bias=True), tp=2)
    mp, out = _convert(tmp_path, index)
    assert mp.config["model_type"] == "qwen2"
    model, info = _load(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    got = model.state_dict()
    assert all(torch.equal(got[n], t) for n, t in sd.items())
    ids = torch.tensor([[1, 5, 9, 96]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_user_table_adds_a_family_without_code(tmp_path):
    """A Mistral table: the Llama rows under another architecture, from a file (as --table FILE)."""
    ref = _hf_model("llama")
    g = mcore_globals(ref.state_dict(), ref.config, padded_vocab=128)
    args = llama_args(ref.config, 128, 97)
    index = write_mcore(tmp_path / "src", g, args, tp=2)
    doc = load_mcore_table("llama").model_dump(mode="json", exclude_none=True)
    doc.update(name="mistral", model_type="mistral", architectures=["MistralForCausalLM"])
    doc["config_defaults"]["sliding_window"] = None
    (tmp_path / "mistral.json").write_text(json.dumps(doc))
    table = pick_table(args, table=str(tmp_path / "mistral.json"))
    assert table.label == f"Megatron-Core table {tmp_path / 'mistral.json'}"
    mp, out = _convert(tmp_path, index, table=table)
    model, info = _load(out)
    assert type(model).__name__ == "MistralForCausalLM" and not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 5, 9, 96]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_unexpected_keys_and_shapes_are_one_error(tmp_path):
    ref = _hf_model("llama")
    g = mcore_globals(ref.state_dict(), ref.config, padded_vocab=128)
    args = llama_args(ref.config, 128, 97)
    index = write_mcore(tmp_path / "src", g, args, tp=1)
    table = pick_table(args)
    extra = dict(index.tensors, **{"decoder.layers.self_attention.mystery.weight":
                                   index.tensors["decoder.final_layernorm.weight"]})
    with pytest.raises(PlanError, match="1 key.* match no row of built-in Megatron-Core table llama: "
                                        "decoder.layers.self_attention.mystery.weight"):
        plan_mcore(dataclasses.replace(index, tensors=extra), table, 10**9)
    with pytest.raises(PlanError, match="linear_qkv.weight: 64 fused QKV rows, but .* = 48"):
        plan_mcore(dataclasses.replace(index, args=dict(args, num_query_groups=1)), table, 10**9)
    with pytest.raises(PlanError, match=r"linear_fc1.weight: makes model.layers.0.mlp.gate_proj.weight of shape "
                                        r"\[48, 32\], but config intermediate_size=40"):
        plan_mcore(dataclasses.replace(index, args=dict(args, ffn_hidden_size=40)), table, 10**9)
    with pytest.raises(PlanError, match="layer axis .* 2 entries, but config num_hidden_layers=3"):
        plan_mcore(dataclasses.replace(index, args=dict(args, num_layers=3)), table, 10**9)
    with pytest.raises(PlanError, match="config.json needs num_hidden_layers.*args.num_layers.*--config FILE"):
        plan_mcore(dataclasses.replace(index, args={k: v for k, v in args.items() if k != "num_layers"}), table, 10**9)
    with pytest.raises(PlanError, match="args.normalization='LayerNorm'"):
        plan_mcore(dataclasses.replace(index, args=dict(args, normalization="LayerNorm")), table, 10**9)
    assert plan_mcore(index, table, 10**9, override={"num_hidden_layers": 2}).config["num_hidden_layers"] == 2

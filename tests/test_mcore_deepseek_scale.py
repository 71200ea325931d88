"""DeepSeek-V3 671B at full scale: a torch_dist save (TP=8, PP=4, EP=8; 33.7k chunks in 1.3 TB of
sparse .distcp files) is planned by the dry run in bounded time and memory, every HF tensor listed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


from tests.mcore_deepseek import DENSE, E, H, KVL, LAYERS, MF, QL, VOCAB, write_deepseek_v3

# The user's command, `ckptflow megatron SRC DEST --dry-run --json` (console_main, as the script runs it),
# in a fresh process: its VmHWM is the CLI's peak, planner included, not pytest's. The plan the CLI
# made is recorded on its way back and written to a file after the peak was read, so one process
# (one torch import, one read of the 33.7k-chunk index) gives both the CLI's output and every tensor.
_CLI = r"""
import json, os, sys, time
import ckptflow.flows.cli.megatron_core as cli_mcore

real, made, planned = cli_mcore.plan_megatron_core, {}, sys.argv[1]

def recorded(*args, **kwargs):
    t = time.monotonic()
    made["index"], made["mp"] = plan = real(*args, **kwargs)
    made["seconds"] = time.monotonic() - t
    return plan

cli_mcore.plan_megatron_core = recorded


def report():
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    index, mp = made["index"], made["mp"]
    tensors = {t.name: [t.dtype, list(t.shape)] for s in mp.plan.shards for t in s.tensors}
    with open(planned, "w") as f:
        json.dump({"seconds": made["seconds"], "hwm": hwm, "tensors": tensors, "config": mp.config,
                   "family": mp.table.model_type, "chunks": sum(len(g.chunks) for g in index.tensors.values()),
                   "tp": index.tp, "pp": index.pp, "ep": index.ep, "read": mp.plan.source_bytes,
                   "total": mp.plan.total_size}, f)


_exit = os._exit
os._exit = lambda code: (report(), _exit(code))  # the CLI may leave by os._exit (flows/runtime/interrupt.py)
from ckptflow.flows.cli import console_main

sys.argv = ["ckptflow", *sys.argv[2:]]
code = console_main()
report()
sys.exit(code)
"""


def expected() -> dict[str, tuple[str, list[int]]]:
    """transformers' DeepseekV3 state dict (BF16, no MTP layer): name → (dtype, shape)."""
    out = {"model.embed_tokens.weight": ("BF16", [VOCAB, H]), "model.norm.weight": ("BF16", [H]),
           "lm_head.weight": ("BF16", [VOCAB, H])}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        out.update({p + "input_layernorm.weight": ("BF16", [H]), p + "post_attention_layernorm.weight": ("BF16", [H]),
                    p + "self_attn.q_a_proj.weight": ("BF16", [QL, H]),
                    p + "self_attn.q_a_layernorm.weight": ("BF16", [QL]),
                    p + "self_attn.q_b_proj.weight": ("BF16", [128 * 192, QL]),
                    p + "self_attn.kv_a_proj_with_mqa.weight": ("BF16", [KVL + 64, H]),
                    p + "self_attn.kv_a_layernorm.weight": ("BF16", [KVL]),
                    p + "self_attn.kv_b_proj.weight": ("BF16", [128 * 256, KVL]),
                    p + "self_attn.o_proj.weight": ("BF16", [H, 128 * 128])})
        if layer < DENSE:
            out.update({p + "mlp.gate_proj.weight": ("BF16", [18432, H]),
                        p + "mlp.up_proj.weight": ("BF16", [18432, H]),
                        p + "mlp.down_proj.weight": ("BF16", [H, 18432])})
            continue
        out.update({p + "mlp.gate.weight": ("BF16", [E, H]), p + "mlp.gate.e_score_correction_bias": ("F32", [E])})
        for x in [f"experts.{e}" for e in range(E)] + ["shared_experts"]:
            out.update({f"{p}mlp.{x}.gate_proj.weight": ("BF16", [MF, H]),
                        f"{p}mlp.{x}.up_proj.weight": ("BF16", [MF, H]),
                        f"{p}mlp.{x}.down_proj.weight": ("BF16", [H, MF])})
    return out


@pytest.mark.slow
def test_deepseek_v3_671b_dry_run_plans_every_tensor(tmp_path):
    src, dest, planned = write_deepseek_v3(tmp_path / "ds"), tmp_path / "hf", tmp_path / "planned.json"
    cli = subprocess.run([sys.executable, "-c", _CLI, str(planned), "megatron", str(src), str(dest), "--dry-run",
                          "--json"], capture_output=True, text=True, timeout=240)
    assert cli.returncode == 0, cli.stderr[-3000:]
    got = json.loads(planned.read_text())
    assert (got["family"], got["tp"], got["pp"], got["ep"]) == ("deepseek_v3", 8, 4, 8)
    assert got["chunks"] > 33_000
    want = expected()
    # DeepSeek-V3's published model.safetensors.index.json names 91,991 tensors: less the MTP layer
    # (model.layers.61: 1,564) and the FP8 weight_scale_inv tensors (45,032) that leaves these 45,395.
    assert len(want) == 91_991 - 1_564 - 45_032
    assert {k: tuple(v) for k, v in got["tensors"].items()} == {k: (d, s) for k, (d, s) in want.items()}
    assert got["total"] == sum(s[0] * (s[1] if len(s) > 1 else 1) * (4 if d == "F32" else 2) for d, s in want.values())
    assert got["read"] == got["total"]  # padding rows and MTP never read
    cfg = got["config"]
    assert (cfg["first_k_dense_replace"], cfg["n_routed_experts"], cfg["q_lora_rank"], cfg["kv_lora_rank"],
            cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["moe_intermediate_size"],
            cfg["vocab_size"], cfg["num_key_value_heads"]) == (3, 256, 1536, 512, 128, 64, 128, 2048, 129280, 128)
    print(f"planned {len(got['tensors'])} tensors from {got['chunks']} chunks in {got['seconds']:.1f} s, "
          f"ckptflow megatron --dry-run: peak RSS {got['hwm'] / 2**20:.0f} MiB")
    assert got["seconds"] < 30 * 2  # 30 s on an idle box; twice that for a shared 2-core one
    # The user's command: one JSON summary, nothing written, the CLI's own peak (VmHWM) under 1 GiB.
    summary = json.loads(cli.stdout)
    assert (summary["family"], summary["tensors"], summary["source_tensors"]) == ("deepseek_v3", 45_395, 925)
    assert "DeepseekV3ForCausalLM" in cli.stderr and "dry run: nothing written" in cli.stderr and not dest.exists()
    assert got["hwm"] < 2**30


def test_first_k_dense_replace_comes_from_moe_layer_freq():
    from ckptflow.tasks.mcore.hf_config import hf_config
    from ckptflow.tasks.mcore.index import McoreIndex
    from ckptflow.tasks.plan.model import PlanError
    from ckptflow.tasks.presets.mcore import load_mcore_table
    from tests.mcore_deepseek import args

    table = load_mcore_table("deepseek_v3")
    a = vars(args())
    cfg = hf_config(McoreIndex("/x", "torch_dist", 1, dict(a, moe_layer_freq=[0, 1, 1, 1]), 8, 4, 8), table)
    assert cfg["first_k_dense_replace"] == 1 and cfg["model_type"] == "deepseek_v3"
    with pytest.raises(PlanError, match=r"moe_layer_freq=\[0, 1, 0, 1\].*dense layers first"):
        hf_config(McoreIndex("/x", "torch_dist", 1, dict(a, moe_layer_freq=[0, 1, 0, 1]), 8, 4, 8), table)
    with pytest.raises(PlanError, match="moe_router_score_function='softmax'"):
        hf_config(McoreIndex("/x", "torch_dist", 1, dict(a, moe_router_score_function="softmax"), 8, 4, 8), table)


def test_small_deepseek_v3_round_trip_gives_transformers_logits(tmp_path):
    """Real bytes at TP=2: a tiny DeepseekV3ForCausalLM's weights in Megatron-Core's DeepSeek keys (per-layer,
    fused q/kv norms, [gate; up] fc1, stacked experts, fp32 expert bias, an MTP layer) come back as the
    same model: no missing or unexpected keys, logits bit-identical."""
    import torch
    import transformers

    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.mcore.plan import plan_mcore, source_checkpoint
    from ckptflow.tasks.presets.mcore import pick_table
    from ckptflow.tasks.run.engine import EnginePass, run_conversion
    from tests.mcore_handmade import write_mcore

    cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(4))  # not zeros: a dropped bias shows
    sd = ref.state_dict()
    g = {"embedding.word_embeddings.weight": torch.cat([sd["model.embed_tokens.weight"], torch.randn(31, 32)]),
         "decoder.final_layernorm.weight": sd["model.norm.weight"],
         "output_layer.weight": torch.cat([sd["lm_head.weight"], torch.randn(31, 32)]),
         "mtp.layers.0.enorm.weight": torch.randn(32), "mtp.layers.0.eh_proj.weight": torch.randn(32, 64),
         "mtp.layers.0.transformer_layer.mlp.router.weight": torch.randn(4, 32)}
    for i in range(3):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        g.update({m + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                  m + "self_attention.linear_q_down_proj.weight": sd[p + "self_attn.q_a_proj.weight"],
                  m + "self_attention.linear_q_up_proj.layer_norm_weight": sd[p + "self_attn.q_a_layernorm.weight"],
                  m + "self_attention.linear_q_up_proj.weight": sd[p + "self_attn.q_b_proj.weight"],
                  m + "self_attention.linear_kv_down_proj.weight": sd[p + "self_attn.kv_a_proj_with_mqa.weight"],
                  m + "self_attention.linear_kv_up_proj.layer_norm_weight": sd[p + "self_attn.kv_a_layernorm.weight"],
                  m + "self_attention.linear_kv_up_proj.weight": sd[p + "self_attn.kv_b_proj.weight"],
                  m + "self_attention.linear_proj.weight": sd[p + "self_attn.o_proj.weight"]})
        if i == 0:
            g.update({m + "mlp.linear_fc1.layer_norm_weight": sd[p + "post_attention_layernorm.weight"],
                      m + "mlp.linear_fc1.weight": torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                              sd[p + "mlp.up_proj.weight"]]),
                      m + "mlp.linear_fc2.weight": sd[p + "mlp.down_proj.weight"]})
            continue
        g.update({m + "pre_mlp_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
                  m + "mlp.router.weight": sd[p + "mlp.gate.weight"],
                  m + "mlp.router.expert_bias": sd[p + "mlp.gate.e_score_correction_bias"],
                  m + "mlp.experts.experts.linear_fc1.weight": sd[p + "mlp.experts.gate_up_proj"],  # [E, gate; up, H]
                  m + "mlp.experts.experts.linear_fc2.weight": sd[p + "mlp.experts.down_proj"],
                  m + "mlp.shared_experts.linear_fc1.weight": torch.cat([sd[p + "mlp.shared_experts.gate_proj.weight"],
                                                                         sd[p + "mlp.shared_experts.up_proj.weight"]]),
                  m + "mlp.shared_experts.linear_fc2.weight": sd[p + "mlp.shared_experts.down_proj.weight"]})
    args = {**vars(__import__("tests.mcore_deepseek", fromlist=["args"]).args()),
            "num_layers": 3, "hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "kv_channels": 8,
            "q_lora_rank": 24, "kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 8,
            "num_experts": 4, "moe_ffn_hidden_size": 16, "moe_shared_expert_intermediate_size": 16,
            "moe_layer_freq": [0, 1, 1], "moe_router_topk": 2, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
            "max_position_embeddings": 64, "vocab_size": 97, "init_method_std": 0.02, "params_dtype": "torch.float32"}
    stacked = {k: (1 if ".experts.experts." in k else 0) for k in g}
    index = write_mcore(tmp_path / "src", {k: v.contiguous() for k, v in g.items()}, args, tp=2, stacked=stacked)
    table = pick_table(index.args)
    # The tiny reference uses plain RoPE; DeepSeek-V3's YaRN default is replaced as a user would with --config.
    mp = plan_mcore(index, table, 10**9, {"rope_scaling": None, "rms_norm_eps": cfg.rms_norm_eps})
    assert mp.config["first_k_dense_replace"] == 1
    assert mp.tensors == len(sd) - 2 * 2 + 2 * 3 * 4  # fused -> 3 per expert
    src, out = open_location(index.root), tmp_path / "hf"
    run_conversion(source_checkpoint(index, mp.plan, src), [EnginePass(mp.plan)], src, open_location(str(out)),
                   str(tmp_path / "work"))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got = model.eval().state_dict()
    for name, t in sd.items():
        assert torch.equal(got[name], t), name
    ids = torch.tensor([[1, 5, 9, 96, 3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

"""DeepSeek-V3 671B at full scale: a torch_dist save (TP=8, PP=4, EP=8; 33.7k chunks in 1.3 TB of
sparse .distcp files) is planned by the dry run in bounded time and memory, every HF tensor listed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


from tests.mcore_deepseek import DENSE, E, H, KVL, LAYERS, MF, QL, VOCAB, write_deepseek_v3

# The dry run's own code path (read the index, pick the table, plan), in a fresh process: its VmHWM
# is the planner's peak, not pytest's.
_PLAN = r"""
import json, sys, time
t = time.monotonic()
from ckptflow.flows.megatron_core import plan_megatron_core
index, mp = plan_megatron_core(sys.argv[1])
took = time.monotonic() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
tensors = {t.name: [t.dtype, list(t.shape)] for s in mp.plan.shards for t in s.tensors}
json.dump({"seconds": took, "hwm": hwm, "tensors": tensors, "config": mp.config, "family": mp.table.model_type,
           "chunks": sum(len(g.chunks) for g in index.tensors.values()), "tp": index.tp, "pp": index.pp,
           "ep": index.ep, "read": mp.plan.source_bytes, "total": mp.plan.total_size}, sys.stdout)
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


def test_deepseek_v3_671b_dry_run_plans_every_tensor(tmp_path):
    src = write_deepseek_v3(tmp_path / "ds")
    run = subprocess.run([sys.executable, "-c", _PLAN, str(src)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
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
          f"peak RSS {got['hwm'] / 2**20:.0f} MiB")
    assert got["hwm"] < 2**30
    assert got["seconds"] < 30 * 2  # 30 s on an idle box; twice that for a shared 2-core one


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

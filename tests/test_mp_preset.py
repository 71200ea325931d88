"""Which MP name table lays a checkpoint out: chosen by config.json's model_type, never guessed; an
unmatched name points at the preset that fits; --drop-unmatched lists what it drops and never
splits a fused group (issue #27: a Llama under the DeepSeek-V3 table lost every k_proj / v_proj)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptflow.flows.dry_run import dry_run_report, print_dry_run
from ckptflow.flows.params import Recipe
from ckptflow.flows.preflight import plan_conversion
from ckptflow.flows.summary_text import print_summary
from ckptflow.storage.urls import open_location
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.planners.mp import plan_mp
from ckptflow.tasks.presets.fused_groups import load_fused_groups
from ckptflow.tasks.presets.mp import builtin_presets, load_preset, parse_preset, preset_for_config
from ckptflow.tasks.presets.tables import TableError

from .helpers import fake_ckpt, make_llama, run_main

H = 8


def llama_names(layers: int = 2) -> list[tuple[str, str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", "BF16", (16, H)), ("model.norm.weight", "BF16", (H,)),
           ("lm_head.weight", "BF16", (16, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{m}_proj.weight", "BF16", (H, H)) for m in "qkvo"]
        out += [(p + f"mlp.{m}_proj.weight", "BF16", (H, H)) for m in ("gate", "up", "down")]
        out += [(p + n, "BF16", (H,)) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")]
    return out


def llama(model_type: str | None = "llama", extra=()):
    config = {"num_hidden_layers": 2} | ({"model_type": model_type} if model_type is not None else {})
    return fake_ckpt({"a.safetensors": llama_names() + list(extra)}, config=config)


def test_built_in_presets_claim_disjoint_model_types():
    claimed = [t for p in builtin_presets() for t in p.model_types]
    assert len(claimed) == len(set(claimed)) and {"deepseek_v3", "llama", "qwen2"} <= set(claimed)
    assert [preset_for_config({"model_type": t}) for t in ("deepseek_v3", "deepseek_v2", "kimi_k2")] == \
        ["deepseek-v3"] * 3
    assert [preset_for_config({"model_type": t}) for t in ("llama", "mistral", "qwen2", "qwen3")] == ["llama"] * 4
    # model_types is data: a user's table may carry it, and a bad one is one message naming the fix
    assert parse_preset({"rules": [["x", "y", "ROW"]], "model_types": ["mine"]}, "inline").model_types == ("mine",)
    with pytest.raises(TableError, match="model_types must be a list of config.json model_type strings"):
        parse_preset({"rules": [["x", "y", "ROW"]], "model_types": "llama"}, "inline")


def test_preset_chosen_by_model_type():
    plan = plan_mp(llama("qwen3"), 2)  # no preset: llama's HF names, q/k/v column-split
    names = {t.name for t in plan.shards[0].tensors}
    assert "model.layers.1.self_attn.k_proj.weight" in names and len(names) == len(llama_names())
    assert plan.dropped == () and plan.dropped_unmatched == ()
    ds = fake_ckpt({"a.safetensors": [("model.layers.0.self_attn.q_a_proj.weight", "BF16", (H, H))]},
                   config={"model_type": "deepseek_v3", "num_hidden_layers": 1})
    assert [t.name for t in plan_mp(ds, 2).shards[1].tensors] == ["layers.0.attn.wq_a.weight"]


@pytest.mark.parametrize("model_type, said", [(None, "config.json has no model_type"),
                                              ("gemma", "config.json's model_type 'gemma' has no built-in MP preset")])
def test_no_or_unknown_model_type_asks_for_preset(model_type, said):
    with pytest.raises(PlanError) as err:
        plan_mp(llama(model_type), 2)
    msg = str(err.value)
    assert msg.startswith(said) and "--preset deepseek-v3 (model_type deepseek_v3" in msg
    assert "--preset llama (model_type llama, mistral, qwen2, qwen3)" in msg and "--preset FILE|URL" in msg
    assert msg.endswith("(preset llama matches every tensor of this checkpoint: pass --preset llama)")
    odd = fake_ckpt({"a.safetensors": [("vision.proj.weight", "BF16", (H, H))]}, config={})
    with pytest.raises(PlanError, match=r"no model_type, .*for a table of your own$"):  # no preset fits: no hint
        plan_mp(odd, 2)


def test_unmatched_names_point_at_the_preset_that_fits():
    with pytest.raises(PlanError) as err:
        plan_mp(llama("llama"), 2, "deepseek-v3")
    msg = str(err.value)
    assert "4 tensor name(s) match no row of preset 'deepseek-v3' (first: model.layers.0.self_attn.k_proj.weight); " \
           "preset llama matches all of them: pass --preset llama:" in msg
    assert "--drop-unmatched" not in msg  # the advice that dropped every k_proj / v_proj
    # the user's own table, unmatched: no built-in fits either, so rows or --drop-unmatched it is
    mine = parse_preset({"rules": [["model.{a|b}.weight", "x", "ROW"]]}, "mine.json")
    with pytest.raises(PlanError, match=r"add rows for them \(--preset FILE\|URL\), or pass --drop-unmatched"):
        plan_mp(fake_ckpt({"f.safetensors": [("model.a.weight", "BF16", (H, H)), ("odd", "BF16", (H,))]}), 1, mine)


def test_drop_unmatched_never_splits_a_fused_group():
    with pytest.raises(PlanError) as err:
        plan_mp(llama("llama"), 2, "deepseek-v3", drop_unmatched=True)
    msg = str(err.value)
    assert "--drop-unmatched refused: it would split 2 fused group(s)" in msg
    assert "fused group qkv: it would drop 'model.layers.0.self_attn.k_proj.weight', " \
           "'model.layers.0.self_attn.v_proj.weight' but keep 'model.layers.0.self_attn.q_proj.weight'" in msg
    assert msg.endswith("preset llama matches every tensor of this checkpoint: pass --preset llama")
    # gate/up too: a table without up_proj rows
    no_up = load_preset("llama").model_dump()
    no_up["rules"] = [r for r in no_up["rules"] if "up_proj" not in r["pattern"]]
    with pytest.raises(PlanError, match=r"fused group gate_up: it would drop 'model.layers.0.mlp.up_proj.weight' "
                                        r"but keep 'model.layers.0.mlp.gate_proj.weight'"):
        plan_mp(llama("llama"), 2, parse_preset(no_up, "no-up.json"), drop_unmatched=True)
    # the fused-groups table decides: without a qkv row the same drop goes through (and is listed)
    no_qkv = [g for g in load_fused_groups() if g.name != "qkv"]
    plan = plan_mp(llama("llama"), 2, "deepseek-v3", drop_unmatched=True, fused_groups=no_qkv)
    assert plan.dropped_unmatched == tuple(f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "kv")


def test_drop_unmatched_drops_whole_groups_and_says_so():
    """A vision tower's q/k/v all unmatched: its group is dropped whole, which is allowed."""
    tower = [(f"vision.blocks.0.attn.{m}_proj.weight", "BF16", (H, H)) for m in "qkv"]
    plan = plan_mp(llama("llama", tower), 2, drop_unmatched=True)
    assert plan.dropped_unmatched == tuple(n for n, _, _ in tower)
    assert plan.warnings == ("--drop-unmatched: 3 tensor(s) match no row of preset 'llama' and are not written "
                             "(each is listed under 'dropped')",)
    assert not any(n.startswith("vision.") for s in plan.shards for n in (t.name for t in s.tensors))


def add_vision_tensor(src) -> str:
    """A third file holding one tensor no llama row matches, listed in the index."""
    name = "model.vision_tower.patch_embed.weight"
    save_file({name: torch.ones(4, 4, dtype=torch.bfloat16)}, str(src / "vision.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "vision.safetensors"
    index["metadata"]["total_size"] += 32
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return name


def test_dry_run_and_summary_list_every_dropped_tensor(tmp_path, capsys):
    src = tmp_path / "src"
    make_llama(src, "llama")
    name = add_vision_tensor(src)
    planned = plan_conversion(open_location(str(src)), Recipe(mp=2, drop_unmatched=True))
    report = dry_run_report(planned, str(src), str(tmp_path / "out"), str(tmp_path / "w"))
    assert report["dropped_unmatched"] == [name]
    assert report["passes"][0]["actions"]["dropped"] == 2  # with the rotary inv_freq the llama table drops
    print_dry_run(report)
    out = capsys.readouterr().out
    assert f"dropped:  1 tensor(s) no preset row matches (--drop-unmatched), not written:\n          {name}\n" in out
    print_summary({"dest": "d", "shards": 2, "tensors": 54, "dropped_tensors": 2, "source_bytes": 1,
                   "bytes_written": 1, "seconds": 1.0, "shard_seconds": 0.5, "dtypes": {},
                   "dropped_unmatched": [name, "b"]})
    assert f"dropped:  2 tensor(s) no preset row matches (--drop-unmatched), not written:\n          {name}\n" \
           "          b\n" in capsys.readouterr().out


def ckptflow(*args: str) -> subprocess.CompletedProcess:
    return run_main(*args)  # in this process: what it prints and refuses, not the process (test_cli_output)


@pytest.mark.slow
def test_cli_llama_mp_picks_llama_and_refuses_the_deepseek_table(prefect_harness, tmp_path):
    src = tmp_path / "llama"
    tensors = make_llama(src, "llama")
    out = tmp_path / "out"
    run = ckptflow("convert", str(src), str(out), "--mp", "2", "--work", str(tmp_path / "w"))
    assert run.returncode == 0, run.stderr
    ranks = []
    for r in range(2):
        with safe_open(str(out / f"model{r}-mp2.safetensors"), "pt") as f:
            ranks.append({n: f.get_tensor(n) for n in f.keys()})
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(tensors)  # HF names kept: the llama table
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert torch.equal(torch.cat([ranks[0][name], ranks[1][name]]), tensors[name]), name

    run = ckptflow("convert", str(src), str(tmp_path / "ds"), "--mp", "2", "--preset", "deepseek-v3")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert "match no row of preset 'deepseek-v3'" in run.stderr and "pass --preset llama" in run.stderr

    run = ckptflow("convert", str(src), str(tmp_path / "drop"), "--mp", "2", "--preset", "deepseek-v3",
                   "--drop-unmatched")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--drop-unmatched refused" in run.stderr and "pass --preset llama" in run.stderr
    assert "would drop 'model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.k_proj.weight'" in run.stderr
    assert "but keep 'model.layers.0.self_attn.q_proj.weight'" in run.stderr
    assert not (tmp_path / "ds").exists() and not (tmp_path / "drop").exists()

    name = add_vision_tensor(src)
    run = ckptflow("convert", str(src), str(tmp_path / "dry"), "--mp", "2", "--drop-unmatched", "--dry-run", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["dropped_unmatched"] == [name]
    assert "dropped:  1 tensor(s) no preset row matches (--drop-unmatched), not written:\n" \
           f"          {name}" in run.stderr  # --json: the text is on stderr

"""Megatron-Core → HF on megatron-core's own saves (tests/data/mcore, made by megatron-core 0.16.1).

fp32 fixtures: transformers loads the output with no missing or unexpected keys and its logits
equal Megatron's own forward (reference_logits.pt) within 1e-5. bf16 fixtures: every output tensor
equals its slice of Megatron's global tensors (read back by torch's DCP reader:
reference_state.safetensors) bit for bit, sliced here with plain torch, independently of the
planner. Every save of one model (torch_dist / legacy, any TP/PP/EP) gives byte-identical output.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptflow.storage.urls import open_location
from ckptflow.tasks.mcore.plan import source_checkpoint
from ckptflow.tasks.run.engine import EnginePass, run_conversion

from .helpers import run_main

DATA = Path(__file__).parent / "data" / "mcore"
# Saves the readers refuse (legacy GroupedMLP stores experts transposed and packed): one error line.
REFUSED = {"mixtral-ep2-groupedmlp-bf16/legacy": "a GroupedMLP weight"}
SAVES = sorted(p.parent for p in DATA.glob("*/*/latest_checkpointed_iteration.txt")
               if f"{p.parent.parent.name}/{p.parent.name}" not in REFUSED)


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def convert(save: Path | str, out: Path | str, work: Path | str, **kw) -> list[dict]:
    from ckptflow.tasks.mcore.source import plan_megatron_core

    index, mp = plan_megatron_core(str(save), **kw)
    src = open_location(index.root)
    result = run_conversion(source_checkpoint(index, mp.plan, src), [EnginePass(mp.plan)], src,
                            open_location(str(out)), str(work))
    return result.records


def _fixture(save: Path) -> dict:
    f = save.parent / "fixture.json"
    return json.loads(f.read_text()) if f.exists() else {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[Path, Path]:
    """Each save converted once (the tests below read the outputs). A save whose args hold no
    vocab_size (training with a Hugging Face tokenizer) gets it from --config, as a user would."""
    root = tmp_path_factory.mktemp("mcore")
    outs = {}
    for i, save in enumerate(SAVES):
        outs[save] = root / f"out{i}"
        kw = {}
        if "args_vocab_size" in _fixture(save) and _fixture(save)["args_vocab_size"] is None:
            (root / f"config{i}.json").write_text(json.dumps({"vocab_size": _fixture(save)["true_vocab_size"]}))
            kw["config"] = str(root / f"config{i}.json")
        convert(save, outs[save], root / f"work{i}", **kw)
    return outs


def _dtype(save: Path) -> str:
    return json.loads((save.parent / "hf_config.json").read_text()).get("torch_dtype", "float32")


@pytest.mark.parametrize("save", [s for s in SAVES if _dtype(s) == "float32"], ids=_id)
def test_transformers_logits_equal_megatron(converted, save):
    import transformers

    out = converted[save]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = torch.load(save.parent / "reference_logits.pt")
    with torch.no_grad():
        got = model.eval()(ref["input_ids"]).logits
    vocab = got.shape[-1]
    assert vocab == json.loads((out / "config.json").read_text())["vocab_size"] < ref["logits"].shape[-1]
    want = ref["logits"][..., :vocab]
    # Measured: ≤ 1.2e-6, and 9e-6 for Qwen2/Qwen3 TP=2 (logits up to ~54: Megatron's TP=2 forward
    # reduces in another order); a wrong QKV grouping or gate/up order is off by 1e-2 or more.
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def _expected_hf(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Megatron's global tensors → HF names, with plain torch (views of [groups, q+k+v, hd, ...])."""
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    per, vocab = heads // groups, cfg["vocab_size"]
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in state and not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    for i in range(cfg["num_hidden_layers"]):
        p, d = f"model.layers.{i}.", "decoder.layers."
        qkv = state[d + "self_attention.linear_qkv.weight"][i].reshape(groups, per + 2, hd, -1)
        out[p + "self_attn.q_proj.weight"] = qkv[:, :per].reshape(heads * hd, -1)
        out[p + "self_attn.k_proj.weight"] = qkv[:, per].reshape(groups * hd, -1)
        out[p + "self_attn.v_proj.weight"] = qkv[:, per + 1].reshape(groups * hd, -1)
        out[p + "self_attn.o_proj.weight"] = state[d + "self_attention.linear_proj.weight"][i]
        out[p + "input_layernorm.weight"] = state[d + "self_attention.linear_qkv.layer_norm_weight"][i]
        if d + "mlp.router.weight" in state:
            out.update(_expected_moe(state, cfg, i))
            out[p + "post_attention_layernorm.weight"] = state[d + "mlp.linear_fc1.layer_norm_weight"][i]
        if d + "mlp.linear_fc1.weight" in state:
            gate, up = state[d + "mlp.linear_fc1.weight"][i].chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = state[d + "mlp.linear_fc2.weight"][i]
            out[p + "post_attention_layernorm.weight"] = state[d + "mlp.linear_fc1.layer_norm_weight"][i]
    return out


def _expected_moe(state: dict[str, torch.Tensor], cfg: dict, i: int) -> dict[str, torch.Tensor]:
    mixtral = cfg["model_type"] == "mixtral"
    mlp = f"model.layers.{i}." + ("block_sparse_moe." if mixtral else "mlp.")
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    d = "decoder.layers.mlp."
    out = {mlp + "gate.weight": state[d + "router.weight"][i]}
    for e in range(state[d + "router.weight"].shape[1]):
        g, u = state[d + "experts.experts.linear_fc1.weight"][i, e].chunk(2)
        out[f"{mlp}experts.{e}.{gate}.weight"], out[f"{mlp}experts.{e}.{up}.weight"] = g, u
        out[f"{mlp}experts.{e}.{down}.weight"] = state[d + "experts.experts.linear_fc2.weight"][i, e]
    return out


@pytest.mark.parametrize("save", [s for s in SAVES if _dtype(s) == "bfloat16"], ids=_id)
def test_bf16_tensors_equal_megatron_bit_for_bit(converted, save):
    out = converted[save]
    cfg = json.loads((out / "config.json").read_text())
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    want = _expected_hf(load_file(save.parent / "reference_state.safetensors"), cfg)
    assert cfg["torch_dtype"] == "bfloat16"
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    assert set(got) >= set(want)


def _model_of(save: Path) -> str:
    """The saves of one canonical model (fixture.json's family and dtype: the generator reshards
    one model into every layout of its family)."""
    fx = _fixture(save)
    return f"{fx['family']}-{fx['dtype']}" if fx else save.parent.name


def test_every_save_of_one_model_gives_identical_bytes(converted):
    by_model: dict[str, list[Path]] = {}
    for save in SAVES:
        by_model.setdefault(_model_of(save), []).append(save)
    compared = 0
    for saves in by_model.values():
        first = {f.name: f.read_bytes() for f in converted[saves[0]].iterdir() if f.is_file()}
        for other in saves[1:]:
            assert {f.name: f.read_bytes() for f in converted[other].iterdir() if f.is_file()} == first, other
            compared += 1
    assert compared >= 1  # at least torch_dist vs legacy of one model


def test_rerun_reuses_committed_shards(tmp_path):
    save = DATA / "llama-gqa-tp1" / "torch_dist"
    out, work = tmp_path / "out", tmp_path / "work"
    first = convert(save, out, work, max_shard_size="40KB")
    assert len(first) > 2 and not any(r["cached"] for r in first)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()  # as if the run died before this shard committed
    again = convert(save, out, work, max_shard_size="40KB")
    assert [r["name"] for r in again if not r["cached"]] == [victim.name]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_cli_dry_run_inspect_and_refusals(tmp_path):
    save = DATA / "llama-gqa-tp1" / "torch_dist"
    dest = tmp_path / "hf"
    dry = run_main("megatron", str(save), str(dest), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Megatron-Core torch_dist, iteration 1, TP=1 PP=1 EP=1" in dry.stdout and "dry run" in dry.stdout
    assert "family:   llama (LlamaForCausalLM" in dry.stdout and not dest.exists()
    bad = run_main("megatron", str(save), str(dest), "--dry-run", "--family", "qwen3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "q_norm" in bad.stderr and "Traceback" not in bad.stderr
    legacy = DATA / "llama-gqa-tp1" / "legacy"
    seen = run_main("inspect", str(legacy))
    assert seen.returncode == 0 and "source:   Megatron-Core legacy, iteration 1" in seen.stdout, seen.stderr
    assert "output:   21 tensors" in seen.stdout
    gpt2 = tmp_path / "gpt2.pt"
    gpt2.write_bytes(b"not a checkpoint")
    run = run_main("megatron", str(gpt2), str(dest), "--dry-run")
    assert run.returncode == 2 and "--dry-run do not apply" in run.stderr and not dest.exists()


def test_fsspec_urls_both_sides_give_the_same_bytes(converted):
    import fsspec

    save = DATA / "llama-gqa-tp1" / "torch_dist"
    fs = fsspec.filesystem("memory")
    root = f"/mcore-{save.parent.name}"
    for f in save.rglob("*"):
        if f.is_file():
            fs.pipe(f"{root}/src/{f.relative_to(save)}", f.read_bytes())
    convert(f"memory://{root}/src", f"memory://{root}/hf", f"memory://{root}/work", max_shard_size="5GB")
    local = converted[save]
    written = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/hf", detail=False))
    assert written == sorted(p.name for p in local.iterdir())
    for p in local.iterdir():
        assert fs.cat(f"{root}/hf/{p.name}") == p.read_bytes(), p.name


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(prefect_harness, tmp_path):
    """The real CLI, SIGKILLed after 2 of its shards committed: the rerun reuses them (not
    rewritten), writes the rest, and equals an uninterrupted conversion byte for byte."""

    from .helpers import kill_slow_cli, tree

    save = DATA / "llama-gqa-tp1" / "torch_dist"
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["megatron", str(save), str(out), "--work", str(work), "--max-shard-size", "40KB", "--json"]
    kill_slow_cli(args, lambda: len(list(out.glob("*.safetensors"))) >= 2)
    committed = sorted(p.name for p in out.glob("*.safetensors"))
    assert not (out / "model.safetensors.index.json").exists()  # nothing claims the checkpoint complete
    mtimes = {n: (out / n).stat().st_mtime_ns for n in committed}
    rerun = run_main(*args)  # in this process: the killed run above is the real process
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert 2 <= summary["cached_shards"] == len(committed) < summary["shards"]
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == mtimes  # reused, not rewritten
    convert(save, tmp_path / "clean", tmp_path / "work-clean", max_shard_size="40KB")
    assert tree(out) == tree(tmp_path / "clean")


@pytest.mark.parametrize("save", sorted(REFUSED))
def test_refused_save_is_one_error_line(tmp_path, save):
    run = run_main("megatron", str(DATA / save), str(tmp_path / "hf"), "--dry-run")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith("error:") and REFUSED[save] in lines[-1], run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "hf").exists()


def test_inspect_shows_a_save_without_its_true_vocab_size(tmp_path):
    """qwen3-tp2 saved no args.vocab_size: inspect (no --tokenizer/--config flags) still shows the plan,
    with the padded vocabulary noted; `megatron` itself refuses to write the padded rows."""
    save = DATA / "qwen3-tp2" / "torch_dist"
    seen = run_main("inspect", str(save))
    assert seen.returncode == 0, seen.stderr
    assert "vocab:    unknown — padded to 128; `megatron` needs --tokenizer or --config" in seen.stdout
    assert "family:   qwen3 (Qwen3ForCausalLM" in seen.stdout and "vocab 128 (padded)" in seen.stdout
    js = run_main("inspect", str(save), "--json")
    summary = json.loads(js.stdout)
    assert summary["vocab_unknown"] is True and summary["vocab_size"] == 128 and summary["tensors"] == 24
    known = run_main("inspect", str(DATA / "qwen2-tp2" / "torch_dist"), "--json")
    assert json.loads(known.stdout)["vocab_unknown"] is False and json.loads(known.stdout)["vocab_size"] == 100
    run = run_main("megatron", str(save), str(tmp_path / "hf"), "--dry-run")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith("error:") and "--tokenizer DIR" in lines[-1], run.stderr

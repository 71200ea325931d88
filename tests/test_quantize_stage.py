"""`--quantize`: tiny models saved by transformers → each scheme, laid out as llm-compressor writes it;
transformers loads the output (compressed-tensors decompresses it) and `--dequant` of it gives the
same bits; fused groups share NVFP4 global scales across shards and experts; refusals; resume;
`--dequant --quantize` in one pass equals two conversions."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptflow.flows.params import Recipe
from ckptflow.flows.preflight import Preflight
from ckptflow.flows.recipe import plan_passes
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.quant_targets import quant_scheme
from ckptflow.tasks.run.engine import run_conversion

from .helpers import PYTHON, ROOT, cli_env, engine_convert, one_error_line, tree
from .quant_fixtures import write

SCHEMES = ["fp8-block", "fp8-channel", "nvfp4", "mxfp4"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def modules(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}"
            for i in range(layers) for p in LINEARS]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def file_of(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def save_llama(path: Path, intermediate: int = 96, files: int = 1) -> Path:
    """A tiny Llama saved by transformers; `files` > 1 re-saves it round robin over that many
    shards, so fused partners (q/k/v, gate/up) land in different files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    if files > 1:
        sd = tensors_of(path)
        (path / "model.safetensors").unlink()
        write(path, dict(sorted(sd.items())), json.loads((path / "config.json").read_text()), files=files)
    return path


def save_qwen2_moe(path: Path) -> Path:
    """A tiny Qwen2-MoE (routed experts, a shared expert and its gate) over 3 shards, round robin."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    Qwen2MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    sd = tensors_of(path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    write(path, dict(sorted(sd.items())), json.loads((path / "config.json").read_text()), files=3)
    return path


def quantize(src: Path, dst: Path, work: Path, **recipe) -> Recipe:
    r = Recipe(**recipe)
    engine_convert(src, dst, work, **r.model_dump())
    return r


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_loads_in_transformers_and_dequant_gives_its_bits(tmp_path, scheme):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = save_llama(tmp_path / "src")
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize=scheme)
    got = tensors_of(out)
    s = quant_scheme(scheme)
    for mod in modules():
        src_shape = tuple(tensors_of(src)[mod + ".weight"].shape)
        for name, dtype, shape, _ in s.outputs(mod, "BF16", src_shape):
            assert name in got, name
            assert tuple(got[name].shape) == shape, name
            want = {"F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "F32": torch.float32,
                    "BF16": torch.bfloat16}[dtype]
            assert got[name].dtype == want, name
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert got[kept].dtype == torch.bfloat16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"] == {s.preset: s.config_group} and qc["format"] == s.format
    assert qc["ignore"] == ["lm_head"] and qc["quant_method"] == "compressed-tensors"

    # transformers (compressed-tensors) loads it on CPU with no missing or unexpected keys …
    model, info = AutoModelForCausalLM.from_pretrained(  # decompressed by compressed-tensors as it loads
        str(out), dtype=torch.bfloat16, output_loading_info=True,
        quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # … and ckptflow's own --dequant of the output gives exactly the weights it decompressed
    back = tmp_path / "back"
    engine_convert(out, back, tmp_path / "work2", dequant=True)
    deq = tensors_of(back)
    sd = {k: v for k, v in model.state_dict().items()}
    for mod in modules():
        ref = sd[mod + ".weight"]
        assert torch.equal(deq[mod + ".weight"].view(torch.int16), ref.to(torch.bfloat16).view(torch.int16)), mod
        orig = tensors_of(src)[mod + ".weight"].float()
        assert (deq[mod + ".weight"].float() - orig).abs().max() <= orig.abs().max() * 0.35  # really quantized
    assert "quantization_config" not in json.loads((back / "config.json").read_text())


def test_moe_every_fused_group_shares_one_global_scale_across_shards(tmp_path):
    src = save_qwen2_moe(tmp_path / "src")
    source_files = {n: f for f, h in scan_checkpoint(open_location(str(src))).headers.items() for n in h.tensors}
    # the fixture splits groups across shards: the test would prove nothing otherwise
    assert source_files["model.layers.0.mlp.experts.0.gate_proj.weight"] != \
        source_files["model.layers.0.mlp.experts.0.up_proj.weight"]
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize="nvfp4")
    got, where = tensors_of(out), file_of(out)
    gs = {k[: -len(".weight_global_scale")]: v.item() for k, v in got.items() if k.endswith("weight_global_scale")}
    pairs = [(f"model.layers.{i}.mlp.experts.{e}.", ("gate_proj", "up_proj")) for i in range(2) for e in range(4)]
    pairs += [(f"model.layers.{i}.mlp.shared_expert.", ("gate_proj", "up_proj")) for i in range(2)]
    pairs += [(f"model.layers.{i}.self_attn.", ("q_proj", "k_proj", "v_proj")) for i in range(2)]
    distinct = set()
    for prefix, members in pairs:
        values = {gs[prefix + m] for m in members}
        assert len(values) == 1, (prefix, values)
        distinct |= values
        assert len({where[f"{prefix}{m}.weight_packed"] for m in members}) == 1  # one file per group
        # the shared value is the one of the group's largest amax
        amax = max(tensors_of(src)[f"{prefix}{m}.weight"].float().abs().max().item() for m in members)
        assert min(gs[prefix + m] for m in members) == pytest.approx(448 * 6 / amax, rel=1e-2)
    assert len(distinct) > 1  # groups do not all share one value
    # router gates and the shared expert's gate stay BF16 and are listed for loaders
    for i in range(2):
        for gate in (f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.mlp.shared_expert_gate.weight"):
            assert got[gate].dtype == torch.bfloat16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"][0] == "lm_head"
    assert "model.layers.0.mlp.gate" in qc["ignore"] and "model.layers.1.mlp.shared_expert_gate" in qc["ignore"]


def test_ignore_adds_modules_and_lists_them(tmp_path):
    src = save_llama(tmp_path / "src")
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize="fp8-channel", ignore=("re:.*down_proj$",))
    got = tensors_of(out)
    assert got["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale" not in got
    assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == \
        ["lm_head", "re:.*down_proj$"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=cli_env(temporary_server=True), timeout=300)


def test_cli_refuses_misfit_shapes_and_quantized_sources_naming_them(tmp_path):
    src = save_llama(tmp_path / "src", intermediate=40)  # down_proj has 40 columns: not a multiple of 16
    before = tree(src)
    run = run_cli("convert", str(src), str(tmp_path / "out"), "--quantize", "nvfp4", "--work", str(tmp_path / "w"))
    line = one_error_line(run, "2 weight(s) cannot take the scheme's 16-column groups", "--ignore")
    for i in range(2):  # each named below the one error line
        assert f"'model.layers.{i}.mlp.down_proj.weight' [64, 40]: 40 columns are not a multiple of 16" \
            in run.stderr, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert tree(src) == before
    # an already quantized checkpoint without --dequant
    q = tmp_path / "q"
    quantize(save_llama(tmp_path / "src2"), q, tmp_path / "w2", quantize="fp8-block")
    run = run_cli("convert", str(q), str(tmp_path / "out2"), "--quantize", "nvfp4", "--work", str(tmp_path / "w3"))
    one_error_line(run, "already quantized", "--dequant")


def test_dry_run_shows_the_amax_pass_and_counts_quantized(tmp_path):
    src = save_llama(tmp_path / "src", files=2)
    run = run_cli("convert", str(src), str(tmp_path / "out"), "--quantize", "nvfp4", "--dry-run", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["stage"] == "quantize"
    amax, write_pass = report["passes"]
    assert amax["stage"] == "quantize-amax" and amax["into"] == "work"
    assert write_pass["actions"]["quantized"] == 14 and write_pass["actions"]["scales"] == 28
    assert report["quantize"]["preset"] == "NVFP4A16" and report["quantize"]["ignore"] == ["lm_head"]
    text = run_cli("convert", str(src), str(tmp_path / "out"), "--quantize", "mxfp4", "--dry-run")
    assert "quantize: compressed-tensors MXFP4A16 (mxfp4-pack-quantized); unquantized: lm_head" in text.stdout
    assert not (tmp_path / "out").exists()


def test_resume_reuses_the_amax_pass_and_committed_shards(tmp_path):
    src = save_llama(tmp_path / "src", files=2)
    recipe = Recipe(quantize="nvfp4", max_shard_size="100KB")
    src_loc, out, work = open_location(str(src)), tmp_path / "out", tmp_path / "work"
    ckpt = scan_checkpoint(src_loc)

    def run():
        passes, _ = plan_passes(ckpt, recipe)
        return run_conversion(ckpt, Preflight(ckpt, recipe, passes).engine_passes(), src_loc,
                              open_location(str(out)), str(work), keep_intermediates=True)

    first = run()
    assert len(first.passes) == 2 and len(first.passes[1].records) > 1
    files = tree(out)
    victim = first.passes[1].records[0]["name"]
    (out / victim).unlink()  # as if the run died before this shard committed
    again = run()
    assert all(r["cached"] for r in again.passes[0].records)  # amax: from the journal, not read again
    cached = [r["cached"] for r in again.passes[1].records]
    assert cached.count(False) == 1 and not again.passes[1].records[0]["cached"]
    assert tree(out) == files


def deepseek_fp8(path: Path) -> Path:
    """DeepSeek-style FP8: e4m3 weights with 128×128 `_scale_inv` (ragged), BF16 norms and embeddings."""
    g = torch.Generator().manual_seed(5)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(64, 160, generator=g).bfloat16()}
    for proj, (r, c) in {"q_proj": (160, 160), "k_proj": (96, 160), "v_proj": (96, 160), "o_proj": (160, 160),
                         "gate_proj": (200, 160), "up_proj": (200, 160), "down_proj": (160, 208)}.items():
        mod = f"model.layers.0.{'mlp' if proj.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{proj}"
        t[mod + ".weight"] = (torch.randn(r, c, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        t[mod + ".weight_scale_inv"] = torch.rand(-(-r // 128), -(-c // 128), generator=g) * 1e-3 + 1e-4
    t["model.layers.0.input_layernorm.weight"] = torch.ones(160).bfloat16()
    t["lm_head.weight"] = torch.randn(64, 160, generator=g).bfloat16()
    config = {"model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    return write(path, dict(sorted(t.items())), config, files=2)


def test_dequant_quantize_in_one_pass_equals_two_conversions_and_reads_each_byte_once_per_pass(tmp_path):
    src = deepseek_fp8(tmp_path / "src")
    ckpt = scan_checkpoint(open_location(str(src)))
    passes, _ = plan_passes(ckpt, Recipe(dequant=True, quantize="nvfp4"))
    amax, write_pass = (p.plan for p in passes)
    weights = sum(i.nbytes for h in ckpt.headers.values() for n, i in h.tensors.items() if "_proj." in n)
    assert write_pass.source_bytes == sum(i.nbytes for h in ckpt.headers.values() for i in h.tensors.values())
    assert amax.source_bytes == weights  # FP8 codes and their block scales, each read once
    one = tmp_path / "one"
    quantize(src, one, tmp_path / "w1", dequant=True, quantize="nvfp4")
    mid, two = tmp_path / "mid", tmp_path / "two"
    engine_convert(src, mid, tmp_path / "w2", dequant=True)
    quantize(mid, two, tmp_path / "w3", quantize="nvfp4")
    assert tree(one) == tree(two)
    assert tensors_of(one)["model.layers.0.mlp.down_proj.weight_packed"].shape == (160, 104)


def test_nvfp4_over_s3_equals_local(tmp_path, s3_options):
    """SOURCE, DEST and the work location (the amax pass, the journal) in a bucket, over moto."""
    import s3fs

    from .helpers import s3_tree

    src = save_llama(tmp_path / "src", files=2)
    local = tmp_path / "local"
    quantize(src, local, tmp_path / "work", quantize="nvfp4")
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(src), f"{bucket}/src", recursive=True)
    recipe = Recipe(quantize="nvfp4")
    src_loc = open_location(f"s3://{bucket}/src", opts)
    ckpt = scan_checkpoint(src_loc)
    passes, _ = plan_passes(ckpt, recipe)
    result = run_conversion(ckpt, Preflight(ckpt, recipe, passes).engine_passes(), src_loc,
                            open_location(f"s3://{bucket}/out", opts), f"s3://{bucket}/work", opts)
    assert [p.plan.stage for p in result.passes] == ["quantize-amax", "quantize"]
    assert s3_tree(fs, f"{bucket}/out") == tree(local)


@pytest.mark.parametrize("scheme", ["fp8-block", "nvfp4"])
def test_stacked_3d_experts_quantize_expert_by_expert(tmp_path, monkeypatch, scheme):
    """A stacked [E, rows, cols] expert weight: each expert is quantized alone (its own 128-row
    blocks, its own row chunks), with the gate/up pair's one global scale for NVFP4."""
    from ckptflow.tasks.kernels.quant_fp4 import nvfp4_global_scale, nvfp4_quantize
    from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize

    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 4096)  # many chunks per expert
    g = torch.Generator().manual_seed(9)
    t = {f"model.layers.0.mlp.experts.{p}.weight": (torch.randn(3, 200, 64, generator=g) * (0.1 if p == "gate_proj"
                                                                                               else 1)).bfloat16()
         for p in ("gate_proj", "up_proj")}
    t["model.layers.0.mlp.gate.weight"] = torch.randn(3, 64, generator=g).bfloat16()
    src = write(tmp_path / "src", t, {"torch_dtype": "bfloat16"})
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize=scheme)
    got = tensors_of(out)
    assert got["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    for p in ("gate_proj", "up_proj"):
        base = f"model.layers.0.mlp.experts.{p}"
        w = t[base + ".weight"]
        if scheme == "fp8-block":
            assert got[base + ".weight_scale"].shape == (3, 2, 1)
            for e in range(3):
                q, s = fp8_block_quantize(w[e], "fp32")
                assert torch.equal(got[base + ".weight"][e].view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(got[base + ".weight_scale"][e], s)
        else:
            amax = max(t[f"model.layers.0.mlp.experts.{m}.weight"].float().abs().max()
                       for m in ("gate_proj", "up_proj"))
            gs = nvfp4_global_scale(amax.bfloat16().reshape(1))
            assert got[base + ".weight_global_scale"].item() == gs.item()
            for e in range(3):
                q, s = nvfp4_quantize(w[e], gs.reshape(1), "fp32")
                assert torch.equal(got[base + ".weight_packed"][e], q)
                assert torch.equal(got[base + ".weight_scale"][e].view(torch.uint8), s.view(torch.uint8))


@pytest.mark.slow
def test_cli_convert_quantize_runs_the_flow_and_counts_quantized(tmp_path):
    """The real CLI and Prefect flow: the amax pass into the work location, the write pass into DEST."""
    src = save_llama(tmp_path / "src", files=2)
    out = tmp_path / "out"
    run = run_cli("convert", str(src), str(out), "--quantize", "nvfp4", "--work", str(tmp_path / "w"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    amax, write_pass = summary["passes"]
    assert amax["stage"] == "quantize-amax" and amax["into"] == "work"
    assert write_pass["actions"]["quantized"] == 14 and write_pass["actions"]["scales"] == 28
    assert "14 quantized" in run.stderr
    local = tmp_path / "local"
    quantize(src, local, tmp_path / "w2", quantize="nvfp4")
    assert tree(out) == tree(local)


def test_upstream_pieces_of_any_size_regroup_into_exact_row_chunks():
    """An upstream transform's pieces (here 7 uneven ones, a piece straddling each chunk boundary, one
    empty) come out as the row chunks asked for, bytes in order, each piece released once."""
    from types import SimpleNamespace

    from ckptflow.tasks.run.buffers import BufferPool
    from ckptflow.tasks.run.quant_write import _regrouped

    w = torch.randn(300, 48).to(torch.bfloat16)
    raw = w.view(torch.int16).numpy().tobytes()
    cuts = [0, 1000, 1001, 1001, 9000, 15000, 20001, len(raw)]
    released: list[int] = []
    pieces = ((memoryview(raw)[a:b], lambda i=i: released.append(i)) for i, (a, b) in enumerate(zip(cuts, cuts[1:])))
    sizes = [128, 128, 44]
    got = [c.clone() for c in _regrouped(pieces, sizes, 48, torch.bfloat16, SimpleNamespace(buffers=BufferPool()))]
    assert [c.shape[0] for c in got] == sizes
    assert torch.equal(torch.cat(got).view(torch.int16), w.view(torch.int16))
    assert sorted(released) == list(range(len(cuts) - 1))

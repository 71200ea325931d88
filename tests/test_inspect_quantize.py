"""`ckptflow inspect SOURCE --quantize SCHEME [--ignore …]`: the scheme `convert --quantize` would
write, checked against what `convert --dry-run` says (one summary, not two) and against the bytes a
real conversion writes. In-process (`run_main`): inspect and --dry-run start no Prefect."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


from .helpers import engine_convert, run_main
from .test_quantize_stage import deepseek_fp8, save_llama, save_qwen2_moe


def cli_json(*argv: str) -> tuple[int, dict]:
    run = run_main(*argv, "--json")
    return run.returncode, json.loads(run.stdout)


def dtypes_of(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def test_nvfp4_names_misfit_shapes_counts_the_rest_and_shows_shared_global_scales(tmp_path):
    src = save_llama(tmp_path / "src", intermediate=88, files=2)  # down_proj: 88 columns, not % 16
    code, r = cli_json("inspect", str(src), "--quantize", "nvfp4")
    q = r["quantize"]
    assert code == 1 and q["scheme"] == "nvfp4" and not q["after_dequant"]
    assert len(q["refused"]) == 2 and all("88 columns are not a multiple of 16" in p for p in q["refused"])
    assert {p.split("'")[1] for p in q["refused"]} == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    w = q["written"]
    assert (w["preset"], w["format"]) == ("NVFP4A16", "nvfp4-pack-quantized")
    assert w["config_group"]["weights"]["group_size"] == 16 and w["ignore"] == ["lm_head"]
    assert w["quantized"]["tensors"] == 12  # 2 layers × (q, k, v, o, gate, up); down_proj refused
    kept = {why: k["tensors"] for why, k in w["unquantized"].items()}
    assert kept == {"refused shape": 2, "norm": 5, "lm_head": 1, "embedding": 1}
    # per layer: q/k/v and gate/up share one global scale each
    assert w["shared_global_scales"]["groups"] == 4 and w["shared_global_scales"]["tensors"] == 10
    assert ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight"] in w["shared_global_scales"]["examples"]

    # the text names each misfit and the --ignore that leaves it out
    run = run_main("inspect", str(src), "--quantize", "nvfp4")
    text = run.stdout
    assert run.returncode == 1
    assert "quantize: compressed-tensors NVFP4A16 (nvfp4-pack-quantized); unquantized: lm_head" in text
    assert "--ignore model.layers.1.mlp.down_proj" in text and "global scales: 4 fused groups" in text

    # with those left out, inspect shows exactly what convert --dry-run shows (one summary)
    ignore = ["--ignore", "model.layers.0.mlp.down_proj", "--ignore", "re:.*1\\.mlp\\.down_proj$"]
    code, r = cli_json("inspect", str(src), "--quantize", "nvfp4", *ignore)
    assert code == 0 and r["quantize"]["refused"] == []
    assert r["quantize"]["written"]["unquantized"]["--ignore"]["tensors"] == 2
    code, dry = cli_json("convert", str(src), str(tmp_path / "out"), "--quantize", "nvfp4", "--dry-run",
                         *ignore)
    assert code == 0 and dry["quantize"] == r["quantize"]["written"]


def test_fp8_block_counts_match_the_bytes_a_conversion_writes(tmp_path):
    src = save_llama(tmp_path / "src")
    code, r = cli_json("inspect", str(src), "--quantize", "fp8-block")
    w = r["quantize"]["written"]
    assert code == 0 and w["shared_global_scales"] is None  # FP8 has no global scale
    out = tmp_path / "out"
    engine_convert(src, out, tmp_path / "work", quantize="fp8-block")
    got = dtypes_of(out)
    fp8 = [n for n, d in got.items() if d == "F8_E4M3"]
    assert len(fp8) == w["quantized"]["tensors"] == 14
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    kept_bytes = sum(k["bytes"] for k in w["unquantized"].values())
    header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in out.glob("*.safetensors"))
    assert written - header == w["quantized"]["bytes_out"] + kept_bytes
    for k in w["unquantized"].values():  # every name it says stays unquantized is written as it was
        assert all(got[n] == "BF16" for n in k["examples"])


def test_moe_router_gates_ignore_and_expert_groups(tmp_path):
    src = save_qwen2_moe(tmp_path / "src")
    code, r = cli_json("inspect", str(src), "--quantize", "nvfp4", "--ignore", "re:.*down_proj$")
    w = r["quantize"]["written"]
    assert code == 0
    kept = {why: k["tensors"] for why, k in w["unquantized"].items()}
    assert kept["router gate"] == 4 and kept["--ignore"] == 10 and kept["bias"] == 6
    assert "model.layers.0.mlp.shared_expert_gate" in w["ignore"] and "re:.*down_proj$" in w["ignore"]
    # per layer: q/k/v, the shared expert's gate/up and each of 4 routed experts' gate/up
    assert w["shared_global_scales"]["groups"] == 12


def test_quantized_source_is_planned_after_dequant(tmp_path):
    src = deepseek_fp8(tmp_path / "src")
    code, r = cli_json("inspect", str(src), "--quantize", "nvfp4")
    q = r["quantize"]
    assert code == 0 and q["after_dequant"] and q["written"]["quantized"]["tensors"] == 7
    assert r["scheme"]["method"] == "fp8"  # the --dequant report is still there


def test_bad_flags_are_one_error_line(tmp_path):
    src = save_llama(tmp_path / "src")
    run = run_main("inspect", str(src), "--ignore", "lm_head")
    err = run.stderr
    assert run.returncode == 2
    assert err.startswith("error: --ignore only applies with --quantize") and err.count("\n") == 1
    code, r = cli_json("inspect", str(src), "--quantize", "mxfp4", "--ignore", "re:(")
    assert code == 1 and "--ignore: pattern 're:('" in r["quantize"]["refused"][0]

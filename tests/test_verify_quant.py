"""`verify` on quantized checkpoints: fused groups share their global scale, grids fit, the config
describes every packed tensor. Real files written by tests/quant_fixtures.py, the real CLI."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.verify_quant import check_layout, read_small, verify_quantization

from .helpers import PYTHON, ROOT, cli_env, engine_convert, one_error_line
from .make_llmc_qwen3_moe import KEEP
from .quant_fixtures import make_llama, make_moe

P = "model.layers.0."
# the fused groups of tests/quant_fixtures.moe_state_dict: q/k/v, MLA q_a+kv_a, 3 routed experts'
# gate/up, Qwen3-MoE's shared_expert and DeepSeek's shared_experts
GROUPS = 7
LLMC_QWEN3_MOE = ROOT / "tests" / "data" / "llmc_qwen3_moe_nvfp4"  # tests/make_llmc_qwen3_moe.py made it


def verify(path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "verify", str(path), *extra], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=120)


def report_of(path):
    loc = open_location(str(path))
    return verify_quantization(scan_checkpoint(loc), loc)


@pytest.mark.parametrize("scheme", ["ct-nvfp4", "modelopt-nvfp4"])
def test_shared_global_scales_pass(tmp_path, scheme):
    report = report_of(make_moe(tmp_path / "m", scheme))
    assert report.ok, report.error_lines()
    assert (report.quantized, report.groups, report.mismatched) == (6 + 5 * 3, GROUPS, [])
    assert report.scale == (".weight_global_scale" if scheme == "ct-nvfp4" else ".weight_scale_2")


@pytest.mark.parametrize("scheme", ["ct-nvfp4", "modelopt-nvfp4"])
def test_mismatched_global_scales_fail_naming_the_groups(tmp_path, scheme):
    # what llm-compressor's model_free_ptq does to experts, shared experts and MLA: one scale each
    odd = {P + "mlp.experts.1.up_proj": 41.0, P + "mlp.shared_experts.gate_proj": 39.5,
           P + "self_attn.kv_a_proj_with_mqa": 12.0}
    path = make_moe(tmp_path / "m", scheme, scales=odd)
    report = report_of(path)
    assert sorted(m.group for m in report.errors) == [
        f"gate_up:{P}mlp.experts.1.", f"gate_up:{P}mlp.shared_experts.", f"mla_qkv_a:{P}self_attn."]
    expert = next(m for m in report.errors if "experts.1" in m.group)
    default = "40" if scheme == "ct-nvfp4" else "0.0250000004"
    assert dict(expert.members) == {P + "mlp.experts.1.gate_proj": default, P + "mlp.experts.1.up_proj": "41"}

    run = verify(path)
    line = one_error_line(run, f"3 of {GROUPS} fused groups do not share one",
                          f"{P}mlp.experts.1. (gate_proj {default}, up_proj 41)",
                          f"{P}self_attn. (kv_a_proj_with_mqa 12, q_a_proj {default})", code=1)
    assert "--quantize nvfp4" in line
    assert f"fused groups sharing one {report.scale.lstrip('.')}: {GROUPS - 3} of {GROUPS}" in run.stdout
    assert "FAILED — 1 problem(s)" in run.stderr

    run = verify(path, "--json")
    assert run.returncode == 1
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and doc["quantization"]["groups_not_sharing"] == 3
    assert doc["quantization"]["fused_groups"] == GROUPS


def test_per_tensor_fp8_mismatch_is_a_warning(tmp_path):
    """vLLM requantizes an FP8 per-tensor fused group to its largest scale: right, only coarser."""
    ckpt = make_moe(tmp_path / "a", "ct-fp8-tensor")
    members = [n.removesuffix(".weight_scale") for n in scan_checkpoint(open_location(str(ckpt))).tensors()
               if n.endswith("_proj.weight_scale") and "down_proj" not in n and "o_proj" not in n]
    scales = {m: 1e-3 * (i + 1) for i, m in enumerate(sorted(members))}  # all different …
    scales[P + "mlp.experts.0.up_proj"] = scales[P + "mlp.experts.0.gate_proj"]  # … but one group's
    path = make_moe(tmp_path / "m", "ct-fp8-tensor", scales=scales)
    report = report_of(path)
    assert report.ok and report.groups == GROUPS and report.scale == ".weight_scale"
    assert sorted(m.group for m in report.mismatched) == sorted(
        [f"gate_up:{P}mlp.{e}." for e in ("experts.1", "experts.2", "shared_expert", "shared_experts")]
        + [f"qkv:{P}self_attn.", f"mla_qkv_a:{P}self_attn."])
    assert {m.severity for m in report.mismatched} == {"warning"}
    run = verify(path)
    assert run.returncode == 0, run.stderr
    assert f"warning: {GROUPS - 1} fused group(s) have different per-tensor FP8 scales" in run.stdout
    assert "error:" not in run.stderr


def test_block_scales_have_no_global_scale_to_share(tmp_path):
    report = report_of(make_moe(tmp_path / "m", "ct-fp8-block"))
    assert report.ok and report.groups == 0 and report.scale is None and report.quantized == 21


def test_f16_block_scales_are_noted_not_failed(tmp_path):
    """An FP16 model's FP8_BLOCK scales are F16 (llm-compressor keeps the weight's dtype): --dequant
    refuses them, but the checkpoint is not wrong, so verify notes it and passes."""
    path = make_moe(tmp_path / "m", "ct-fp8-block", files=1)
    sd = load_file(path / "model.safetensors")
    sd = {n: t.half() if n.endswith("weight_scale") else t for n, t in sd.items()}
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    report = report_of(path)
    assert report.ok and not report.problems and len(report.notes) == 21
    run = verify(path)
    assert run.returncode == 0 and "note: 21 scale grid(s) not checked" in run.stdout, run.stdout + run.stderr


def test_reads_only_the_small_scales(tmp_path):
    """Headers plus 4 bytes per quantized weight, merged into a few range reads."""
    path = make_moe(tmp_path / "m", "ct-nvfp4", files=3)
    loc = open_location(str(path))
    ckpt = scan_checkpoint(loc)
    asked = []

    def read(refs):
        asked.extend(refs)
        return read_small(loc, refs)

    assert check_layout(ckpt, read).ok
    # the members of fused groups: not o_proj or down_proj, which share with nothing
    assert sorted(r.name for r in asked) == sorted(n for n in ckpt.tensors() if n.endswith("weight_global_scale")
                                                   and "o_proj" not in n and "down_proj" not in n)
    assert sum(r.end - r.start for r in asked) == 4 * 15


def test_unquantized_member_of_a_quantized_group_fails(tmp_path):
    path = make_moe(tmp_path / "m", "ct-nvfp4", files=1)
    sd = load_file(path / "model.safetensors")
    for suffix in (".weight_packed", ".weight_scale", ".weight_global_scale"):
        del sd[P + "self_attn.k_proj" + suffix]
    sd[P + "self_attn.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    report = report_of(path)
    [bad] = report.errors
    assert bad.group == f"qkv:{P}self_attn." and dict(bad.members)[P + "self_attn.k_proj"] == "unquantized"


def test_scale_grid_that_does_not_fit(tmp_path):
    path = make_moe(tmp_path / "m", "ct-nvfp4", files=1)
    sd = load_file(path / "model.safetensors")
    name = P + "mlp.experts.2.down_proj.weight_scale"
    sd[name] = sd[name][:, :1].contiguous()  # [64, 2] for 32 columns in groups of 16 → [64, 1]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    run = verify(path)
    one_error_line(run, "experts.2.down_proj.weight_packed", "scale shape [64, 1] does not match weight [64, 32]",
                   "expected [64, 2]", code=1)


def test_modelopt_grid_that_does_not_fit(tmp_path):
    path = make_llama(tmp_path / "m", "modelopt-nvfp4")
    file = next(path.glob("*.safetensors"))
    sd = load_file(file)
    name = next(n for n in sd if n.endswith("q_proj.weight_scale"))
    sd[name] = torch.cat([sd[name], sd[name][:1]]).contiguous()  # one row too many
    save_file(sd, file, metadata={"format": "pt"})
    report = report_of(path)
    [problem] = report.problems
    assert name.removesuffix("_scale") in problem and "does not match weight" in problem


def test_packed_tensor_outside_every_config_group(tmp_path):
    """Config groups that target attention only: the packed MLP weights are described by nothing."""
    path = make_moe(tmp_path / "m", "ct-nvfp4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:.*self_attn.*"]
    (path / "config.json").write_text(json.dumps(config))
    report = report_of(path)
    assert not report.ok
    # each of the 15 MLP Linears: its codes in no config group, its FP8 block scales undescribed
    assert sum("is in no config group" in p for p in report.problems) == 15
    assert sum("does not describe it" in p for p in report.problems) == 15 == len(report.problems) - 15
    assert any(f"'{P}mlp.experts.0.gate_proj.weight_packed'" in p for p in report.problems)
    run = verify(path)
    assert run.returncode == 1 and run.stderr.count("error: ") == 30


def test_ignore_listed_module_holding_packed_weights(tmp_path):
    path = make_moe(tmp_path / "m", "ct-nvfp4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*mlp\\.shared_expert\\..*"]
    (path / "config.json").write_text(json.dumps(config))
    report = report_of(path)
    assert not report.ok
    ignored = [p for p in report.problems if "in the ignore list" in p]
    assert len(ignored) == 3  # gate, up, down: one line each
    assert any(f"module '{P}mlp.shared_expert.gate_proj'" in p for p in ignored)
    assert len(report.problems) == 3, report.problems  # no generic line for their packed codes or scales


def test_unsupported_scheme_is_noted_not_failed(tmp_path):
    """GPTQ and co.: verify checks their dtypes as before and says their scales are not checked."""
    path = make_llama(tmp_path / "m", "ct-nvfp4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    run = verify(path)
    assert run.returncode == 0, run.stderr
    assert "quantization: not one ckptflow reads" in run.stdout and "'gptq'" in run.stdout


def test_on_s3(s3_options, tmp_path):
    import s3fs

    opts, bucket = s3_options["options"], s3_options["bucket"]
    path = make_moe(tmp_path / "m", "modelopt-nvfp4", scales={P + "mlp.experts.0.gate_proj": 0.5})
    s3fs.S3FileSystem(**opts).put(str(path) + "/", f"{bucket}/m/", recursive=True)
    loc = open_location(f"s3://{bucket}/m", opts)
    report = verify_quantization(scan_checkpoint(loc), loc)
    assert [m.group for m in report.errors] == [f"gate_up:{P}mlp.experts.0."]
    assert report.groups == GROUPS


def test_llm_compressor_model_free_ptq_output_fails_on_every_expert():
    """llm-compressor 0.14's model_free_ptq (NVFP4A16) on a tiny Qwen3-MoE: it pairs self_attn.q/k/v but
    gives each routed expert's gate_proj and up_proj a global scale of its own (issue #30)."""
    report = report_of(LLMC_QWEN3_MOE)
    assert report.scheme.startswith("compressed-tensors nvfp4-pack-quantized") and not report.problems
    assert (report.quantized, report.groups) == (4 + 4 * 3, 5)
    assert sorted(m.group for m in report.errors) == [f"gate_up:{P}mlp.experts.{e}." for e in range(4)]
    stored = load_file(LLMC_QWEN3_MOE / "model.safetensors")
    for m in report.errors:  # the values verify read by range are the ones in the file
        for module, value in m.members:
            assert value == f"{stored[module + '.weight_global_scale'].item():.9g}"
    run = verify(LLMC_QWEN3_MOE)
    one_error_line(run, "4 of 5 fused groups do not share one weight_global_scale", f"{P}mlp.experts.0. (gate_proj ",
                   code=1)
    assert "fused groups sharing one weight_global_scale: 1 of 5" in run.stdout


@pytest.mark.slow
def test_llm_compressor_reference_regenerates(tmp_path):
    """The kept reference is what the generator makes today (same weights seed, same llm-compressor)."""
    from .helpers import llmc_python  # llm-compressor is in the test extra; CI fails without it

    subprocess.run([llmc_python(), str(ROOT / "tests" / "make_llmc_qwen3_moe.py"),
                    str(tmp_path / "out")], check=True, capture_output=True, timeout=300)
    for name in KEEP:
        if name.endswith(".safetensors"):
            assert load_file(tmp_path / "out" / name).keys() == load_file(LLMC_QWEN3_MOE / name).keys()
    assert report_of(tmp_path / "out").groups == 5 and len(report_of(tmp_path / "out").errors) == 4


@pytest.mark.parametrize("scheme", ["nvfp4", "fp8-block"])
def test_ckptflows_own_quantized_output_passes(tmp_path, scheme):
    """ckptflow's --quantize plans fused groups across shards: every group shares its global scale."""
    from .quant_fixtures import moe_state_dict, write

    src = write(tmp_path / "bf16", moe_state_dict(), {"model_type": "qwen3_moe", "torch_dtype": "bfloat16",
                                                      "num_hidden_layers": 1}, files=3)
    engine_convert(str(src), str(tmp_path / "out"), quantize=scheme, work=str(tmp_path / "w"))
    report = report_of(tmp_path / "out")
    assert report.ok and not report.mismatched, report.error_lines()
    assert report.quantized == 21 and report.groups == (GROUPS if scheme == "nvfp4" else 0)

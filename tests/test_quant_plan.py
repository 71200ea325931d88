"""Scheme detection and refusal on plain numbers: no bytes, no torch."""
from __future__ import annotations

import math
import re

import pytest

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.storage.safetensors_format import DTYPE_SIZES, Header, TensorInfo
from ckptflow.tasks.plan.model import PlanError, ShardPlan, StagePlan
from ckptflow.tasks.planners.dequant import plan_dequant, refuse_packed_leftovers
from ckptflow.tasks.planners.quant_layout import detect

from .quant_fixtures import ct_fp8_config, ct_nvfp4_config


def ckpt_of(entries: list[tuple[str, str, tuple[int, ...]]], config=None, quant_config=None) -> Checkpoint:
    tensors, off = {}, 100
    for name, dtype, shape in entries:
        n = DTYPE_SIZES[dtype] * math.prod(shape)
        tensors[name] = TensorInfo(name, dtype, shape, off, off + n)
        off += n
    header = Header("model.safetensors", off, 100, tensors)
    return Checkpoint("mem://x", {"model.safetensors": off, "config.json": 10}, {"model.safetensors": header},
                      config=config, quant_config=quant_config)


LINEAR = [("m.q_proj.weight", "F8_E4M3", (300, 260)), ("m.norm.weight", "BF16", (260,))]


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_unknown_scheme_is_refused_by_name(method):
    ckpt = ckpt_of([("m.q_proj.qweight", "I32", (32, 256)), ("m.q_proj.scales", "F16", (2, 256))],
                   {"torch_dtype": "float16", "quantization_config": {"quant_method": method, "bits": 4}})
    with pytest.raises(PlanError) as err:
        plan_dequant(ckpt)
    msg = str(err.value)
    assert f"quantization scheme {method!r} is not one ckptflow can dequantize" in msg
    assert "config.json quantization_config" in msg and "Nothing was written" in msg
    assert "F16" not in msg  # not the old, wrong reason ("F16, config says BF16")


def test_compressed_tensors_int4_pack_is_refused_by_name():
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                       "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}}
    with pytest.raises(PlanError, match=r"compressed-tensors pack-quantized \(int 4-bit, group\)"):
        plan_dequant(ckpt_of([("m.q_proj.weight_packed", "I32", (8, 32))], cfg))


def test_unknown_scale_dtype_and_misfit_grids_are_one_error_naming_each():
    cfg = {"quantization_config": ct_fp8_config("block", (128, 128))}
    ckpt = ckpt_of([
        ("a.weight", "F8_E4M3", (300, 260)), ("a.weight_scale", "F64", (3, 3)),       # unknown scale dtype
        ("b.weight", "F8_E4M3", (300, 260)), ("b.weight_scale", "BF16", (2, 3)),      # floor, not ceil
        ("c.weight", "F8_E4M3", (256, 256)), ("c.weight_scale", "BF16", (2, 2)),      # fits
    ], cfg)
    with pytest.raises(PlanError) as err:
        plan_dequant(ckpt)
    msg = str(err.value)
    assert msg.startswith("compressed-tensors float-quantized (config.json quantization_config): "
                          "2 tensor(s) cannot be dequantized; nothing was written")
    assert "'a.weight_scale' is F64; ct-fp8 scales must be BF16 or F16 or F32" in msg
    assert ("b.weight: scale shape [2, 3] does not match weight [300, 260] with 128×128 blocks "
            "(expected [3, 3])") in msg
    assert "c.weight" not in msg


def test_misfit_fp4_grids_are_refused():
    nv = ckpt_of([("x.weight_packed", "U8", (37, 40)), ("x.weight_scale", "F8_E4M3", (37, 4)),
                  ("x.weight_global_scale", "F32", (1,))], {"quantization_config": ct_nvfp4_config()})
    with pytest.raises(PlanError, match=r"scale shape \[37, 4\] does not match weight \[37, 80\] in groups of 16 "
                                        r"\(expected \[37, 5\]\)"):
        plan_dequant(nv)
    mx = ckpt_of([("e.gate_up_proj_blocks", "U8", (2, 8, 3, 16)), ("e.gate_up_proj_scales", "U8", (2, 8, 2))],
                 {"quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(PlanError, match=r"scales shape \[2, 8, 2\] does not match blocks \[2, 8, 3, 16\]"):
        plan_dequant(mx)


def test_a_packed_tensor_no_rule_covers_is_refused_not_copied():
    """A tensor inside a known scheme that cannot be handled: an orphan MXFP4 block, a 3-D
    per-channel FP8 weight."""
    mx = ckpt_of([("e.down_proj_blocks", "U8", (2, 8, 3, 16))], {"quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(PlanError, match="'e.down_proj_blocks' is U8 but its scale 'e.down_proj_scales' is not in"):
        plan_dequant(mx)
    ch = ckpt_of([("x.weight", "F8_E4M3", (2, 8, 16)), ("x.weight_scale", "BF16", (2, 8, 1))],
                 {"quantization_config": ct_fp8_config("channel")})
    with pytest.raises(PlanError, match="per-channel FP8 needs a 2-D F8_E4M3 weight"):
        plan_dequant(ch)


def test_groups_ignore_and_activation_scales():
    cfg = {"quantization_config": ct_fp8_config("channel", static_input=True)}
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float"}
    ckpt = ckpt_of([("m.q_proj.weight", "F8_E4M3", (8, 16)), ("m.q_proj.weight_scale", "BF16", (8, 1)),
                    ("m.q_proj.input_scale", "F32", (1,)), ("m.self_attn.k_scale", "F32", ()),
                    ("lm_head.weight", "BF16", (10, 16))], cfg)
    layout = detect(ckpt)
    assert list(layout.quantized) == ["m.q_proj.weight"] and layout.consumed == {"m.q_proj.weight_scale"}
    assert sorted(layout.activations) == ["m.q_proj.input_scale", "m.self_attn.k_scale"]
    plan = plan_dequant(ckpt)
    assert [t.name for t in plan.shards[0].tensors] == ["m.q_proj.weight", "lm_head.weight"]
    assert set(plan.dropped) == {"m.q_proj.weight_scale", "m.q_proj.input_scale", "m.self_attn.k_scale"}


def test_modelopt_reads_hf_quant_config_and_plans_both_conventions():
    entries = [("a.weight", "U8", (4, 16)), ("a.weight_scale", "F8_E4M3", (4, 2)), ("a.weight_scale_2", "F32", ())]
    quant = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}
    t = plan_dequant(ckpt_of(entries, {"torch_dtype": "bfloat16"}, quant)).shards[0].tensors[0]
    assert (t.name, t.dtype, t.shape, t.transform) == ("a.weight", "BF16", (4, 32), "nvfp4")
    assert t.param("convention") == "modelopt"
    quant["quantization"]["quant_algo"] = "W4A8_AWQ"
    with pytest.raises(PlanError, match="'modelopt W4A8_AWQ' is not one ckptflow can dequantize"):
        plan_dequant(ckpt_of(entries, {"torch_dtype": "bfloat16"}, quant))


def test_mxfp4_output_is_transformers_layout():
    ckpt = ckpt_of([("e.gate_up_proj_blocks", "U8", (4, 128, 2, 16)), ("e.gate_up_proj_scales", "U8", (4, 128, 2))],
                   {"dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}})
    plan = plan_dequant(ckpt)
    (t,) = plan.shards[0].tensors
    assert (t.name, t.shape, t.transform) == ("e.gate_up_proj", (4, 64, 128), "mxfp4_gpt_oss")
    assert plan.config == {"dtype": "bfloat16"}


def test_finalize_check_refuses_a_config_claiming_unquantized_over_codes():
    src = ckpt_of([("e.gate_up_proj_blocks", "U8", (1, 2, 1, 16))])
    info = src.headers["model.safetensors"].tensors["e.gate_up_proj_blocks"]
    from ckptflow.tasks.plan.model import OutputTensor, SourceRef

    plan = StagePlan("copy", (ShardPlan("model.safetensors", (OutputTensor(
        info.name, "U8", info.shape, "copy", (SourceRef.of("model.safetensors", info),)),)),), {"dtype": "bfloat16"})
    with pytest.raises(PlanError, match="would claim an unquantized model while 1 tensor"):
        refuse_packed_leftovers(plan, plan.config, "mem://dest")
    refuse_packed_leftovers(plan, {"quantization_config": {"quant_method": "mxfp4"}}, "mem://dest")  # honest


def test_module_patterns_outside_the_linear_subset_are_refused_before_matching():
    cfg = {"quantization_config": ct_fp8_config("channel")}
    cfg["quantization_config"]["ignore"] = ["lm_head", r"re:(\w+)\.\1"]
    with pytest.raises(PlanError, match="^" + re.escape(r"config.json quantization_config.ignore: pattern 're:(\\w+)"
                                                        r"\\.\\1' uses a backreference")):
        plan_dequant(ckpt_of(LINEAR, cfg))
    cfg["quantization_config"]["ignore"] = ["re:.*mlp.gate$", "re:(["]
    with pytest.raises(PlanError, match=re.escape("pattern 're:([' is not a valid regex")):
        plan_dequant(ckpt_of(LINEAR, cfg))
    cfg["quantization_config"]["ignore"] = []
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:(?<=m)\\.q_proj"]
    with pytest.raises(PlanError, match=r"group_0.targets: pattern .* uses a lookbehind"):
        plan_dequant(ckpt_of(LINEAR, cfg))


def test_nested_quantifiers_are_matched_not_refused():
    """`(x+)+` shapes backtrack in re; the linear matcher answers them (the old guard refused)."""
    cfg = {"quantization_config": ct_fp8_config("channel")}
    cfg["quantization_config"]["ignore"] = ["re:((.+))+k_proj$", "re:(.|\\w)+@"]
    entries = [(f"model.layers.0.self_attn.{p}.{s}", d, shape) for p in ("q_proj", "k_proj")
               for s, d, shape in (("weight", "F8_E4M3", (8, 16)), ("weight_scale", "BF16", (8, 1)))]
    layout = detect(ckpt_of(entries, cfg))
    assert list(layout.quantized) == ["model.layers.0.self_attn.q_proj.weight"]
    # k_proj is ignored: its FP8 weight and scale are then something the config does not describe
    (problem,) = layout.problems
    assert problem.startswith("model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' is F8_E4M3")
    assert "does not describe it" in problem


def test_verify_knows_quantization_parameters_by_scheme():
    from ckptflow.tasks.planners.torch_dtype import check_dtypes

    gptq = [("m.q_proj.qweight", "I32", (8, 64)), ("m.q_proj.scales", "F16", (1, 64)),
            ("m.q_proj.qzeros", "I32", (1, 8)), ("m.norm.weight", "BF16", (64,))]
    quant = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    assert check_dtypes(ckpt_of(gptq, quant)).ok  # its scales are F16 by design, not a "wrong dtype"
    bare = check_dtypes(ckpt_of(gptq, {"torch_dtype": "bfloat16"}))  # quantization_config deleted
    assert {(m.tensor, m.reason) for m in bare.mismatches} == {
        ("m.q_proj.qweight", "packed quantized codes without a quantization_config"),
        ("m.q_proj.qzeros", "packed quantized codes without a quantization_config"),
        ("m.q_proj.scales", "")}
    nvfp4 = [("x.weight_packed", "U8", (4, 8)), ("x.weight_scale", "F8_E4M3", (4, 1)),
             ("x.weight_global_scale", "F32", (1,))]
    assert check_dtypes(ckpt_of(nvfp4, {"dtype": "bfloat16", "quantization_config": ct_nvfp4_config()})).ok
    modelopt = [("a.weight", "U8", (4, 8)), ("a.weight_scale", "F8_E4M3", (4, 1)), ("a.weight_scale_2", "F32", ())]
    assert check_dtypes(ckpt_of(modelopt, {"dtype": "bfloat16"}, {"quantization": {"quant_algo": "NVFP4"}})).ok
    assert not check_dtypes(ckpt_of(modelopt, {"dtype": "bfloat16"})).ok

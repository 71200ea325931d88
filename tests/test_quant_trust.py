"""Never fake data (issue #27): tensors no scheme describes are refused; zero, negative and NaN/inf
scales are refused (small ones at planning, block/channel ones before their shard commits), and
with --allow-nonfinite the inf/NaN written are counted in the summary and --json. Real bytes,
the CLI's `main(argv)`; SOURCE is hashed before and after."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.kernels.finite import bad_scales
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.plan.model import PlanError

from .helpers import fake_ckpt, one_error_line, run_main
from .quant_fixtures import ct_fp8_config, ct_nvfp4_config, random_codes, write

NVFP4_CT = "model.layers.0.self_attn.q_proj"
MODELOPT = {"producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}


def ckptflow(*args: str) -> subprocess.CompletedProcess:
    return run_main(*args)  # in this process: what it prints and refuses, not the process (test_cli_output)


def sha256s(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def poke(path, tensor: str, flat_index: int, value: float) -> str:
    """Overwrite one element of `tensor` in place (the scale dtype's bytes); returns its file."""
    ckpt = scan_checkpoint(open_location(str(path)))
    file, info = ckpt.tensors()[tensor]
    np_dtype = {"F32": np.float32, "BF16": None}[info.dtype]
    raw = np.array([value], dtype=np_dtype).tobytes() if np_dtype else \
        np.array([value], np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).tobytes()
    with open(path / file, "r+b") as f:
        f.seek(info.start + flat_index * len(raw))
        f.write(raw)
    return file


def nvfp4(rows: int = 32, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.randint(0x20, 0x40, (rows, cols // 16), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    return random_codes((rows, cols // 2), g, special=False), scale


def ct_nvfp4_zero_global(tmp_path):
    packed, scale = nvfp4()
    src = write(tmp_path / "src", {NVFP4_CT + ".weight_packed": packed, NVFP4_CT + ".weight_scale": scale,
                                   NVFP4_CT + ".weight_global_scale": torch.tensor([0.0]),
                                   "lm_head.weight": torch.ones(8, 64, dtype=torch.bfloat16)},
                {"torch_dtype": "bfloat16", "quantization_config": ct_nvfp4_config()}, files=2)
    return src, f"tensor '{NVFP4_CT}.weight_global_scale' (scale of '{NVFP4_CT}.weight_packed'): holds 1 zero", \
        NVFP4_CT + ".weight"


def modelopt_inf_scale_2(tmp_path):
    packed, scale = nvfp4(seed=1)
    name = "model.layers.0.mlp.down_proj"
    src = write(tmp_path / "src", {name + ".weight": packed, name + ".weight_scale": scale,
                                   name + ".weight_scale_2": torch.tensor(math.inf)},
                {"torch_dtype": "bfloat16"}, files=2, extra={"hf_quant_config.json": MODELOPT})
    return src, f"tensor '{name}.weight_scale_2' (scale of '{name}.weight'): holds 1 NaN/inf", name + ".weight"


def ct_fp8_nan_channel(tmp_path):
    g = torch.Generator().manual_seed(2)
    name = "model.layers.0.mlp.gate_proj"
    w = random_codes((48, 64), g, special=False).view(torch.float8_e4m3fn)
    src = write(tmp_path / "src", {name + ".weight": w, name + ".weight_scale": torch.full((48, 1), 1e-3).bfloat16(),
                                   "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)},
                {"torch_dtype": "bfloat16", "quantization_config": ct_fp8_config("channel")}, files=2)
    poke(src, name + ".weight_scale", 17, math.nan)
    return src, f"tensor '{name}.weight_scale' (scale of '{name}.weight'): holds 1 NaN/inf of its 48", name + ".weight"


def deepseek_nan_block(tmp_path, demo_ckpt):
    name = "model.layers.0.self_attn.q_a_proj.weight"
    poke(demo_ckpt, name + "_scale_inv", 1, math.nan)
    return demo_ckpt, f"tensor '{name}_scale_inv' (scale of '{name}'): holds 1 NaN/inf", name


CASES = {"ct-nvfp4 zero global scale": ct_nvfp4_zero_global, "modelopt inf weight_scale_2": modelopt_inf_scale_2,
         "ct-fp8 NaN channel scale": ct_fp8_nan_channel, "deepseek NaN block scale": deepseek_nan_block}
AT_PLANNING = {"ct-nvfp4 zero global scale", "modelopt inf weight_scale_2"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scale_is_one_error_then_allowed_and_counted(prefect_harness, tmp_path, request, case):
    make = CASES[case]
    src, expected, weight = make(tmp_path, request.getfixturevalue("demo_ckpt")) if "deepseek" in case \
        else make(tmp_path)
    before = sha256s(src)
    weight_file = scan_checkpoint(open_location(str(src))).tensors()[weight.replace(".weight", ".weight_packed")
                                                                      if "weight_packed" in expected else weight][0]
    out = tmp_path / "out"
    run = ckptflow("convert", str(src), str(out), "--dequant", "--work", str(tmp_path / "w"))
    one_error_line(run, expected, "--allow-nonfinite")  # exit 2, no traceback, one error line
    assert sha256s(src) == before
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    # planning refusals write nothing; a stream refusal leaves at most the other, checked shards
    assert written == [] if case in AT_PLANNING else weight_file not in written, written
    assert "config.json" not in written and "model.safetensors.index.json" not in written

    allowed = tmp_path / "allowed"
    run = ckptflow("convert", str(src), str(allowed), "--dequant", "--allow-nonfinite", "--json",
                   "--work", str(tmp_path / "w2"))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)  # --json: stdout is one JSON document, the text is on stderr
    with safe_open(str(allowed / weight_file), "pt") as f, safe_open(str(src / weight_file), "pt") as s:
        codes = s.get_tensor(weight) if weight in s.keys() else None  # FP8 codes; packed E2M1 is all finite
        finite = codes.float().isfinite() if codes is not None and codes.is_floating_point() else True
        made = int((~f.get_tensor(weight).isfinite() & finite).sum())
    assert made > 0 and summary["nonfinite"] == {
        "values": made, "tensors": [{"file": weight_file, "tensor": weight, "count": made}]}
    assert f"nonfinite: {made} inf/NaN value(s)" in run.stderr and weight in run.stderr
    assert sha256s(src) == before


def test_int8_weight_with_a_scale_in_a_ct_fp8_checkpoint_is_refused(prefect_harness, tmp_path):
    g = torch.Generator().manual_seed(3)
    q = "model.layers.0.self_attn.q_proj"
    o = "model.layers.0.self_attn.o_proj"
    src = write(tmp_path / "src", {
        q + ".weight": random_codes((16, 32), g).view(torch.float8_e4m3fn), q + ".weight_scale": torch.ones(16, 1),
        o + ".weight": torch.randint(-128, 127, (16, 32), dtype=torch.int8, generator=g),
        o + ".weight_scale": torch.full((16, 1), 0.01),
        "model.rotary_emb.position_ids": torch.arange(64)},  # an integer buffer: not a weight, no scale
        {"torch_dtype": "bfloat16", "quantization_config": ct_fp8_config("channel")})
    before = sha256s(src)
    out = tmp_path / "out"
    run = ckptflow("convert", str(src), str(out), "--dequant", "--work", str(tmp_path / "w"))
    assert run.returncode == 2 and run.stderr.count("error:") == 1, run.stderr
    assert run.stderr.startswith("error: compressed-tensors float-quantized (config.json quantization_config): "
                                 "1 tensor(s) cannot be dequantized; nothing was written")
    assert (f"model.safetensors: tensor '{o}.weight' is I8 (integer) with a scale beside it ('{o}.weight_scale') "
            "but the quantization_config (compressed-tensors float-quantized, config.json quantization_config) "
            "does not describe it") in run.stderr
    assert "position_ids" not in run.stderr and "Traceback" not in run.stderr
    assert not out.exists() or not any(out.iterdir())
    assert sha256s(src) == before


def test_verify_flags_an_int8_weight_without_quantization_config(prefect_harness, tmp_path):
    src = write(tmp_path / "src", {"m.o_proj.weight": torch.zeros(4, 8, dtype=torch.int8),
                                   "m.norm.weight": torch.ones(8, dtype=torch.bfloat16),
                                   "m.position_ids": torch.arange(8)}, {"torch_dtype": "bfloat16"})
    run = ckptflow("verify", str(src))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 tensor(s) are quantized/integer but config.json has no quantization_config" in run.stdout
    assert "tensor 'm.o_proj.weight' is I8" in run.stdout and "position_ids" not in run.stdout
    assert "all floating tensors match" not in run.stdout


def test_planner_refuses_what_no_scheme_covers_and_passes_integer_buffers():
    cfg = {"torch_dtype": "bfloat16", "quantization_config": ct_fp8_config("channel")}
    base = [("m.q_proj.weight", "F8_E4M3", (8, 16)), ("m.q_proj.weight_scale", "BF16", (8, 1)),
            ("m.position_ids", "I64", (1, 64)), ("m.buf.idx", "I32", (4,))]
    (shard,) = plan_dequant(fake_ckpt({"a.safetensors": base}, cfg)).shards
    assert [t.transform for t in shard.tensors] == ["fp8_scaled", "copy", "copy"]  # integer buffers: copied
    for extra, why in [
        ([("m.k_proj.weight", "I8", (8, 16))], "'m.k_proj.weight' is I8, quantized, packed or integer codes"),
        ([("m.k_proj.weight", "BF16", (8, 16)), ("m.k_proj.weight_zero_point", "I8", (8, 1))],
         "'m.k_proj.weight' is BF16 (floating) with a scale beside it ('m.k_proj.weight_zero_point')"),
        ([("m.idx", "I32", (4,)), ("m.idx_scale", "F32", (1,))], "'m.idx' is I32 (integer) with a scale beside it"),
    ]:
        with pytest.raises(PlanError, match="cannot be dequantized") as err:
            plan_dequant(fake_ckpt({"a.safetensors": base + extra}, cfg))
        assert why in str(err.value)
    none = fake_ckpt({"a.safetensors": [("x.weight", "I8", (4, 4)), ("x.weight_scale", "F32", (4, 1))]},
                     {"torch_dtype": "bfloat16"})
    with pytest.raises(PlanError, match="config.json has no quantization_config that describes it"):
        plan_dequant(none)


def test_scale_rules_on_the_bits():
    f32 = np.array([1.0, 0.0, -2.0, np.nan, np.inf, -0.0], np.float32)
    assert bad_scales("F32", f32[:1].tobytes()) is None
    assert bad_scales("F32", f32.tobytes()) == "holds 2 NaN/inf and 2 zero and 1 negative of its 6 value(s) " \
                                               "(the first at flat index 1)"
    assert bad_scales("F8_E8M0", bytes([0, 127, 254])) is None  # 2^-127 .. 2^127: positive, finite
    assert "1 NaN/inf" in bad_scales("F8_E8M0", bytes([127, 255]))
    assert "1 NaN/inf" in bad_scales("F8_E4M3", bytes([0x38, 0x7F])) and "1 negative" in bad_scales("F8_E4M3", b"\xb8")
    assert "1 zero" in bad_scales("F16", np.array([0.0], np.float16).tobytes())

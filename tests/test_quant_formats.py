"""Every quantized format through the planner and the streaming executor, bit for bit against an
independent reference: compressed-tensors' own decompression, transformers' MXFP4 code, and
plain-torch formulas written here (FP8 block scale dtypes, ModelOpt). Chunks are made tiny so
every tensor streams in many pieces; scales sit in another shard than their weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.run.execute import write_shard
from .quant_fixtures import random_codes, write

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def same_bits(a: torch.Tensor, b: torch.Tensor, any_nan: bool = False) -> bool:
    """Bit for bit; with `any_nan`, a NaN may be any NaN encoding (see the BF16-channel case)."""
    if not (a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape):
        return False
    if any_nan:
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def convert(tmp_path, tensors, config, monkeypatch, extra=None, nonfinite=None, backend="auto"):
    """Plan `--dequant` and write every shard with 4 KB chunks; returns (plan, output tensors).
    With a `nonfinite` dict, inf/NaN are allowed and their counts (per tensor) gathered into it."""
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 4096)
    src = open_location(str(write(tmp_path / "src", tensors, config, files=2, extra=extra)))
    plan = plan_dequant(scan_checkpoint(src), allow_nonfinite=nonfinite is not None)
    dst = open_location(str(tmp_path / "out"))
    out = {}
    for shard in plan.shards:
        record = write_shard(shard, src, dst, backend=backend)
        if nonfinite is not None:
            nonfinite.update(record.nonfinite)
        with safe_open(str(tmp_path / "out" / shard.file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return plan, out


def block_reference(w: torch.Tensor, s32: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bf16(float32(w) × float32(s)) per block, ragged edges cut."""
    bm, bn = block
    rows, cols = w.shape[-2:]
    full = s32.repeat_interleave(bm, -2).repeat_interleave(bn, -1)[..., :rows, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F8_E8M0"])
def test_fp8_block_every_scale_dtype(tmp_path, monkeypatch, scale_dtype):
    g = torch.Generator().manual_seed(1)
    w = random_codes((300, 260), g).view(torch.float8_e4m3fn)           # ragged: 3×3 blocks of 128
    experts = random_codes((2, 130, 200), g).view(torch.float8_e4m3fn)  # stacked, ragged too
    if scale_dtype == "F8_E8M0":
        # power-of-two scales; codes 0 (2^-127), 254 (2^127) and 255 (NaN) included
        s, se = (torch.randint(110, 140, shape, dtype=torch.uint8, generator=g) for shape in ((3, 3), (2, 2, 2)))
        s.view(-1)[:3] = torch.tensor([0, 254, 255], dtype=torch.uint8)
        s, se = s.view(torch.float8_e8m0fnu), se.view(torch.float8_e8m0fnu)
    else:
        dt = torch.float32 if scale_dtype == "F32" else torch.bfloat16
        s, se = torch.rand(3, 3, generator=g).to(dt), torch.rand(2, 2, 2, generator=g).to(dt)
    config = {"dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                           "weight_block_size": [128, 128]}}
    counts: dict[str, int] | None = {} if scale_dtype == "F8_E8M0" else None  # a NaN scale: allowed, counted
    plan, out = convert(tmp_path, {"l.w.weight": w, "l.w.weight_scale_inv": s, "e.w": experts,
                                   "e.w_scale_inv": se, "norm.weight": torch.ones(260, dtype=torch.bfloat16)},
                        config, monkeypatch, nonfinite=counts)
    ref = block_reference(w, s.to(torch.float32), (128, 128))
    assert same_bits(out["l.w.weight"], ref)
    assert same_bits(out["e.w"], block_reference(experts, se.to(torch.float32), (128, 128)))
    if counts is not None:  # 2^127 overflows, NaN spoils its block: counted where the codes were finite
        made = int((~ref.isfinite() & w.float().isfinite()).sum())
        assert made > 0 and counts == {"l.w.weight": made}
    assert sorted(out) == ["e.w", "l.w.weight", "norm.weight"]
    assert plan.config == {"dtype": "bfloat16"}  # the source's key spelling, no torch_dtype added


@pytest.mark.parametrize("strategy,scale_dtype", [("tensor", torch.float32), ("channel", torch.bfloat16),
                                                  ("channel", torch.float16), ("channel", torch.float32),
                                                  ("block", torch.bfloat16), ("block", torch.float32)])
def test_compressed_tensors_fp8_matches_its_own_decompression(tmp_path, monkeypatch, strategy, scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from .quant_fixtures import ct_fp8_config

    g = torch.Generator().manual_seed(2)
    w = random_codes((70, 200), g).view(torch.float8_e4m3fn)
    shape = {"tensor": (1,), "channel": (70, 1), "block": (3, 7)}[strategy]  # block 32x32, ragged
    s = (torch.rand(shape, generator=g) * 1e-2).to(scale_dtype)
    cfg = {"torch_dtype": "bfloat16",
           "quantization_config": ct_fp8_config(strategy, (32, 32) if strategy == "block" else None, True)}
    tensors = {"m.q_proj.weight": w, "m.q_proj.weight_scale": s,
               "m.q_proj.input_scale": torch.tensor([0.5])}
    plan, out = convert(tmp_path, tensors, cfg, monkeypatch)
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy,
                            block_structure=[32, 32] if strategy == "block" else None)
    # compressed-tensors multiplies in the scale dtype; transformers then casts to the model dtype
    want = dequantize(x_q=w, scale=s, args=args).to(torch.bfloat16)
    # Known kernel gap (reported to the fp4 branch): NaN codes × a BF16/F16 scale come out 0xFFFF
    # (the kernels' all-ones NaN), 0x7FC0 from compressed-tensors; every other bit matches.
    assert same_bits(out["m.q_proj.weight"], want, any_nan=scale_dtype != torch.float32)
    assert list(out) == ["m.q_proj.weight"]  # scale folded in, activation scale dropped …
    assert any("m.q_proj.input_scale" in w for w in plan.warnings)  # … and listed
    assert plan.config == {"torch_dtype": "bfloat16"}


def test_compressed_tensors_nvfp4_matches_its_own_decompression(tmp_path, monkeypatch):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from .quant_fixtures import ct_nvfp4_config

    g = torch.Generator().manual_seed(3)
    packed = random_codes((37, 40), g, special=False)                  # 80 columns, every nibble value
    scale = random_codes((37, 5), g).view(torch.float8_e4m3fn)          # zero, subnormal, ±max, NaN scales
    gscale = torch.tensor([448.0 * 6.0 / 3.5])
    cfg = {"torch_dtype": "bfloat16", "text_config": {"quantization_config": ct_nvfp4_config(), "dtype": "float16"}}
    # every scale code, zero, negative and NaN ones included: allowed here, as the reference decodes them
    plan, out = convert(tmp_path, {"x.weight_packed": packed, "x.weight_scale": scale, "x.weight_global_scale": gscale},
                        cfg, monkeypatch, nonfinite={})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16))
    want = NVFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale,
                                             "weight_global_scale": gscale}, scheme)["weight"].to(torch.bfloat16)
    assert same_bits(out["x.weight"], want)
    # nested quantization_config removed; each dtype key kept where it was
    assert plan.config == {"torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}}


def test_gpt_oss_mxfp4_matches_transformers(tmp_path, monkeypatch):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(4)
    blocks = random_codes((3, 40, 4, 16), g, special=False)   # [E, OUT, IN/32, 16]
    scales = torch.randint(100, 150, (3, 40, 4), dtype=torch.uint8, generator=g)
    scales.view(-1)[:4] = torch.tensor([0, 1, 254, 127], dtype=torch.uint8)  # E8M0 extremes
    bias = torch.randn(3, 40, generator=g).to(torch.bfloat16)
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    plan, out = convert(tmp_path, {name + "_blocks": blocks, name + "_scales": scales, name + "_bias": bias},
                        cfg, monkeypatch, nonfinite={})  # 2^127 overflows: allowed here
    want = convert_moe_packed_tensors(blocks.clone(), scales.clone())
    assert out[name].shape == (3, 128, 40)  # [E, IN, OUT], as transformers' BF16 gpt-oss checkpoints
    assert same_bits(out[name], want)
    assert torch.equal(out[name + "_bias"], bias)
    assert sorted(out) == [name, name + "_bias"]


def test_modelopt_nvfp4_and_fp8_match_the_formula(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    packed = random_codes((20, 24), g, special=False)
    scale = random_codes((20, 3), g).view(torch.float8_e4m3fn)
    s2 = torch.tensor(0.0173)
    w8 = random_codes((33, 50), g).view(torch.float8_e4m3fn)
    s8 = torch.tensor(0.0041)
    quant = {"producer": {"name": "modelopt", "version": "0.29.0"},
             "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}
    plan, out = convert(tmp_path, {"a.weight": packed, "a.weight_scale": scale, "a.weight_scale_2": s2,
                                   "a.input_scale": torch.tensor(1.0)},
                        {"torch_dtype": "bfloat16"}, monkeypatch, extra={"hf_quant_config.json": quant},
                        nonfinite={})  # every scale code, as the formula decodes them
    # ModelOpt: value = e2m1(code) × float32(weight_scale) × weight_scale_2, codes low nibble first
    lut = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float32)
    lut[8] = 0.0  # ModelOpt's table holds +0 where the sign bit is set on a zero
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(20, 48).long()
    eff = (scale.to(torch.float32) * s2).repeat_interleave(16, 1)
    assert same_bits(out["a.weight"], (lut[codes] * eff).to(torch.bfloat16))
    assert "hf_quant_config.json" not in plan.copy_files and "config.json" in plan.copy_files

    quant["quantization"] = {"quant_algo": "FP8"}
    (tmp_path / "src").rename(tmp_path / "old")
    _, out = convert(tmp_path, {"b.weight": w8, "b.weight_scale": s8}, {"torch_dtype": "bfloat16"}, monkeypatch,
                     extra={"hf_quant_config.json": quant})
    assert same_bits(out["b.weight"], (w8.to(torch.float32) * s8).to(torch.bfloat16))


def test_dequant_output_passes_verify_and_source_would_not_without_config(tmp_path, monkeypatch):
    """verify: packed codes under a config without quantization_config are a mismatch."""
    from ckptflow.tasks.planners.torch_dtype import check_dtypes

    g = torch.Generator().manual_seed(6)
    tensors = {"e.down_proj_blocks": random_codes((2, 8, 1, 16), g), "e.down_proj_scales":
               torch.full((2, 8, 1), 127, dtype=torch.uint8)}
    config = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}
    src = write(tmp_path / "src", tensors, config)
    assert check_dtypes(scan_checkpoint(open_location(str(src)))).ok
    (src / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))  # what the old --dequant wrote
    report = check_dtypes(scan_checkpoint(open_location(str(src))))
    assert [m.tensor for m in report.mismatches] == ["e.down_proj_blocks", "e.down_proj_scales"]
    assert "packed quantized codes without a quantization_config" in report.text()


@pytest.mark.parametrize("fmt", ["ct-fp8-channel", "ct-nvfp4", "mxfp4", "fp8-block-e8m0"])
def test_streamed_triton_path_writes_the_same_bytes(tmp_path, monkeypatch, fmt):
    """The executor with backend="triton" (the Triton interpreter here) against the CPU tables."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 2048)
    from .quant_fixtures import ct_fp8_config, ct_nvfp4_config

    g = torch.Generator().manual_seed(7)
    if fmt == "ct-fp8-channel":
        tensors = {"x.weight": random_codes((24, 40), g).view(torch.float8_e4m3fn),
                   "x.weight_scale": torch.rand(24, 1, generator=g).to(torch.bfloat16)}
        cfg = {"quantization_config": ct_fp8_config("channel")}
    elif fmt == "ct-nvfp4":
        tensors = {"x.weight_packed": random_codes((20, 16), g), "x.weight_scale": random_codes(
            (20, 2), g).view(torch.float8_e4m3fn), "x.weight_global_scale": torch.tensor([3.0])}
        cfg = {"quantization_config": ct_nvfp4_config()}
    elif fmt == "mxfp4":
        tensors = {"e.down_proj_blocks": random_codes((2, 24, 2, 16), g),
                   "e.down_proj_scales": torch.randint(0, 255, (2, 24, 2), dtype=torch.uint8, generator=g)}
        cfg = {"quantization_config": {"quant_method": "mxfp4"}}
    else:
        s = torch.randint(0, 256, (2, 2), dtype=torch.uint8, generator=g)
        s.view(-1)[:2] = torch.tensor([0, 254], dtype=torch.uint8)
        tensors = {"x.weight": random_codes((40, 36), g).view(torch.float8_e4m3fn),
                   "x.weight_scale_inv": s.view(torch.float8_e8m0fnu)}
        cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}}
    src = open_location(str(write(tmp_path / "src", tensors, {"torch_dtype": "bfloat16", **cfg})))
    # every scale code, NaN and overflowing ones included: written and counted, the same on both paths
    (shard,) = plan_dequant(scan_checkpoint(src), allow_nonfinite=True).shards
    a = write_shard(shard, src, open_location(str(tmp_path / "cpu")), digest=True, backend="torch")
    b = write_shard(shard, src, open_location(str(tmp_path / "triton")), digest=True, backend="triton")
    assert a.sha256 == b.sha256 and a.size == b.size and a.nonfinite == b.nonfinite

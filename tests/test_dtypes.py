"""Verify dtypes (seed 004): float32 experts under a bfloat16 config are caught and fixed."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.errors import UserError
from ckptflow.storage.urls import open_location
from ckptflow.tasks.planners.torch_dtype import check_dtypes

from .helpers import engine_convert, run_main


def moe_ckpt(path, expert_dtype=torch.float32, config_dtype="bfloat16"):
    """Seed 004's case: experts restored as float32 while config.torch_dtype is bfloat16."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    bf = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    shard1 = {"model.embed_tokens.weight": bf(50, 16), "model.layers.0.mlp.gate.weight": bf(4, 16),
              "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(4, generator=g)}
    shard2 = {}
    for e in range(4):
        for proj, shape in (("gate_proj", (24, 16)), ("up_proj", (24, 16)), ("down_proj", (16, 24))):
            t = torch.randn(*shape, generator=g) * 3
            t.view(-1)[:3] = torch.tensor([1 + 2**-9, -(1 + 3 * 2**-9), float("inf")])  # rounding ties, inf
            shard2[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = t.to(expert_dtype)
    save_file(shard1, path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(shard2, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    wm = ({k: "model-00001-of-00002.safetensors" for k in shard1}
          | {k: "model-00002-of-00002.safetensors" for k in shard2})
    total = sum(t.numel() * t.element_size() for t in (shard1 | shard2).values())
    index = {"metadata": {"total_size": total}, "weight_map": wm}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "torch_dtype": config_dtype}))
    return path, shard2


def test_float32_experts_fail_verify_with_names(tmp_path):
    path, experts = moe_ckpt(tmp_path / "m")
    report = check_dtypes(scan_checkpoint(open_location(str(path))))
    assert sorted(m.tensor for m in report.mismatches) == sorted(experts)  # bias is float32 by design
    assert report.table["F32"] == [13, 4 * 4 + 12 * 24 * 16 * 4]
    assert "model-00002-of-00002.safetensors: tensor 'model.layers.0.mlp.experts.0.down_proj.weight' is F32, " \
           "config says BF16" in report.text()
    run = run_main("verify", str(path))
    assert run.returncode == 1
    assert "12 mismatch(es)" in run.stdout and "experts.3.up_proj.weight" in run.stdout
    assert "--fix-dtypes" in run.stderr


def test_fix_dtypes_casts_exactly_and_passes(tmp_path):
    path, experts = moe_ckpt(tmp_path / "m")
    out = tmp_path / "fixed"
    summary = engine_convert(str(path), str(out), dequant=False, fix_dtypes=True, work=str(tmp_path / "w"))
    assert summary["dtypes"] == {"BF16": 14, "F32": 1}
    assert check_dtypes(scan_checkpoint(open_location(str(out)))).ok
    with safe_open(str(out / "model-00002-of-00002.safetensors"), "pt") as f:
        for name, t in experts.items():
            got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), name
    with safe_open(str(out / "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.gate.e_score_correction_bias").dtype == torch.float32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("*.safetensors"))


def test_convert_without_fix_refuses_before_writing(tmp_path):
    path, _ = moe_ckpt(tmp_path / "m")
    with pytest.raises(UserError, match="12 tensor\\(s\\) would not match config.json's torch_dtype"):
        engine_convert(str(path), str(tmp_path / "o"), dequant=True, work=str(tmp_path / "w"))
    with pytest.raises(UserError, match="nothing to do"):
        engine_convert(str(path), str(tmp_path / "o"), dequant=False, work=str(tmp_path / "w"))
    assert not (tmp_path / "o").exists()


def test_allow_patterns_dict_form_and_fp8_rules(tmp_path):
    path, _ = moe_ckpt(tmp_path / "m")
    ckpt = scan_checkpoint(open_location(str(path)))
    assert check_dtypes(ckpt, (r"\.experts\.\d+\.",)).ok
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = {"": "bfloat16", "experts": "float32"}
    (path / "config.json").write_text(json.dumps(cfg))
    assert check_dtypes(scan_checkpoint(open_location(str(path)))).ok
    # FP8 passes only with a quantization_config and its scale
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    w = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    save_file({"a.weight": w, "a.weight_scale_inv": torch.ones(1, 1), "b.weight": w.clone()}, fp8 / "model.safetensors")
    (fp8 / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    reasons = {m.tensor: m.reason for m in check_dtypes(scan_checkpoint(open_location(str(fp8)))).mismatches}
    assert reasons == {"a.weight": "FP8 without a quantization_config", "b.weight": "FP8 without a quantization_config",
                       "a.weight_scale_inv": ""}
    (fp8 / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {"fmt": "e4m3"}}))
    reasons = {m.tensor: m.reason for m in check_dtypes(scan_checkpoint(open_location(str(fp8)))).mismatches}
    assert reasons == {"b.weight": "FP8 without its scale tensor"}


def test_bad_torch_dtype_in_config_is_a_clear_error(tmp_path):
    path, _ = moe_ckpt(tmp_path / "m", config_dtype="bfloat17")
    with pytest.raises(UserError, match="config.json: torch_dtype is 'bfloat17'"):
        check_dtypes(scan_checkpoint(open_location(str(path))))

"""compressed-tensors mxfp4-pack-quantized (issue #30): `--dequant` writes what compressed-tensors'
own `MXFP4PackedCompressor.decompress` returns, bit for bit, on the CPU tables and the Triton
kernel (interpreter here); misfit grids, ragged groups and wrong scale dtypes are refused at
planning with one error naming the tensor; an E8M0 scale of 0xFF (NaN) is refused before its
shard commits, or written as compressed-tensors computes it and counted."""
from __future__ import annotations

import hashlib

import pytest
import torch

from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.planners.dequant import plan_dequant
from ckptflow.tasks.run.execute import write_shard
from ckptflow.tasks.run.finite_guard import NonFiniteError

from .helpers import one_error_line, run_main
from .quant_fixtures import ct_mxfp4_compress, ct_mxfp4_config, ct_mxfp4_scheme, write
from .test_quant_formats import convert, same_bits

A, B = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"


def decompress(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own decompression of one module (BF16, whatever the model dtype)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor

    return MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale},
                                            ct_mxfp4_scheme())["weight"]


def config() -> dict:
    return {"torch_dtype": "bfloat16", "quantization_config": ct_mxfp4_config()}


def modules(seed: int, extremes: tuple[int, ...] = (0, 1, 254, 255)) -> dict[str, torch.Tensor]:
    """A: a random BF16 Linear [37, 96] (ragged rows, 3 groups) compressed by compressed-tensors.
    B: every byte value, E8M0 scale codes spread around 127 plus `extremes` (0: 2^-127, results
    subnormal; 254: products overflow; 255: NaN)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(37, 96, generator=g) * 0.02).to(torch.bfloat16)
    a = ct_mxfp4_compress(w)
    assert a["weight_packed"].shape == (37, 48) and a["weight_scale"].dtype == torch.uint8  # their layout
    packed = torch.arange(256, dtype=torch.uint8).repeat(5).reshape(20, 64)  # 128 columns: 4 groups
    scale = torch.randint(100, 150, (20, 4), dtype=torch.uint8, generator=g)
    scale.view(-1)[:len(extremes)] = torch.tensor(extremes, dtype=torch.uint8)
    return {A + ".weight_packed": a["weight_packed"], A + ".weight_scale": a["weight_scale"],
            B + ".weight_packed": packed, B + ".weight_scale": scale,
            "model.norm.weight": torch.ones(96, dtype=torch.bfloat16)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dequant_equals_compressed_tensors_decompression(tmp_path, monkeypatch, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tensors = modules(seed=1)
    counts: dict[str, int] = {}
    plan, out = convert(tmp_path, tensors, config(), monkeypatch, nonfinite=counts, backend=backend)
    want_a = decompress(tensors[A + ".weight_packed"], tensors[A + ".weight_scale"])
    want_b = decompress(tensors[B + ".weight_packed"], tensors[B + ".weight_scale"])
    assert want_a.isfinite().all() and want_a.abs().max() > 0  # real weights, not zeros
    assert same_bits(out[A + ".weight"], want_a)
    assert out[B + ".weight"].shape == (20, 128)
    assert same_bits(out[B + ".weight"], want_b)  # 255: ±inf, NaN for zero codes, as theirs
    # every inf/NaN there came from finite E2M1 codes (254 overflows, 255 spoils its group): counted
    assert counts == {B + ".weight": int((~want_b.isfinite()).sum())} and counts[B + ".weight"] > 32
    assert sorted(out) == [A + ".weight", B + ".weight", "model.norm.weight"]
    assert plan.config == {"torch_dtype": "bfloat16"}


def test_nan_scale_is_refused_before_its_shard_commits_and_code_zero_is_not(tmp_path):
    """E8M0 has no zero (code 0 is 2^-127) and 0xFF is NaN (`kernels/finite.py`): a 255 stops the
    shard, naming the scale and its weight; codes 0..252 go through unflagged (6 × 2^125 is the
    largest product; from 253 on, 4 and 6 overflow BF16 and are refused as made inf)."""
    src = open_location(str(write(tmp_path / "bad", modules(seed=2, extremes=(0, 255)), config())))
    (shard,) = plan_dequant(scan_checkpoint(src)).shards
    with pytest.raises(NonFiniteError, match=rf"tensor '{B}.weight_scale' \(scale of '{B}.weight_packed'\): "
                                             r"holds 1 NaN/inf of its 80 value\(s\) \(the first at flat index 1\)"):
        write_shard(shard, src, open_location(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "model.safetensors").exists()

    src = open_location(str(write(tmp_path / "good", modules(seed=2, extremes=(0, 0, 252)), config())))
    (shard,) = plan_dequant(scan_checkpoint(src)).shards
    record = write_shard(shard, src, open_location(str(tmp_path / "good-out")))
    assert not record.nonfinite and record.tensors == 3


def header_case(tmp_path, name: str, packed: tuple[int, int], scale: tuple[int, int], scale_dtype=torch.uint8,
                weights: dict | None = None):
    """A checkpoint of one module `B` (zeros: these cases are refused from the headers alone)."""
    cfg = config()
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights or {})
    return write(tmp_path / name, {B + ".weight_packed": torch.zeros(packed, dtype=torch.uint8),
                                   B + ".weight_scale": torch.zeros(scale, dtype=scale_dtype),
                                   "lm_head.weight": torch.ones(4, 64, dtype=torch.bfloat16)}, cfg)


REFUSALS = {  # case → (packed shape, scale shape, scale dtype, config weights, what the error says)
    "scale grid": ((20, 64), (20, 3), torch.uint8, None,
                   f"{B}.weight_packed: scale shape [20, 3] does not match weight [20, 128] in groups of 32 "
                   "(expected [20, 4]) (ct-mxfp4)"),
    "ragged group": ((20, 40), (20, 3), torch.uint8, None,
                     f"{B}.weight_packed: 80 columns are not a multiple of the MXFP4 group of 32"),
    "scale dtype in the file": ((20, 64), (20, 4), torch.float8_e8m0fnu, None,
                                f"'{B}.weight_scale' is F8_E8M0; ct-mxfp4 scales must be U8"),
    "scale dtype in the config": ((20, 64), (20, 4), torch.uint8, {"scale_dtype": "torch.float8_e4m3fn"},
                                  "MXFP4 scales are uint8 E8M0 exponents, the config says scale_dtype "
                                  "'torch.float8_e4m3fn'"),
    "group size": ((20, 64), (20, 8), torch.uint8, {"group_size": 16},
                   "MXFP4 is group strategy with group_size 32, got 'group' 16"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_misfit_is_refused_at_planning_naming_the_tensor(tmp_path, case):
    packed, scale, dtype, weights, expected = REFUSALS[case]
    with pytest.raises(PlanError) as err:
        plan_dequant(scan_checkpoint(open_location(str(header_case(tmp_path, "src", packed, scale, dtype,
                                                                    weights)))))
    assert expected in str(err.value) and "Traceback" not in str(err.value)


def test_cli_refuses_a_misfit_with_one_error_line_and_writes_nothing(tmp_path):
    """The CLI's main(argv): exit 2, one `error:` line naming the tensor, DEST empty,
    SOURCE byte for byte as before."""

    for case in ("scale grid", "scale dtype in the file"):
        packed, scale, dtype, weights, expected = REFUSALS[case]
        src = header_case(tmp_path, case.replace(" ", "-"), packed, scale, dtype, weights)
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
        dest = tmp_path / f"out-{src.name}"
        run = run_main("convert", str(src), str(dest), "--dequant", "--work", str(tmp_path / f"w-{src.name}"))
        one_error_line(run, "1 tensor(s) cannot be dequantized; nothing was written")
        assert expected in run.stderr, run.stderr  # the problem line under it names the tensor
        assert not dest.exists() or not any(dest.iterdir())
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()} == before

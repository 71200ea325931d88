"""Quantized-format kernels, bit-exact against their references, CPU tables == Triton (interpreter).

References: transformers' `convert_moe_packed_tensors` (MXFP4), compressed-tensors' own
decompressors (FP8 float-quantized, NVFP4), and plain-torch formulas written here from the
public descriptions (ModelOpt NVFP4/FP8, FP8 block scales in BF16/E8M0). NaN payloads: torch's
own depend on the element's position in its vector loop, so NaN positions must match and our
NaN bits must be the canonical all-ones; every other element must match bit for bit.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does this too; repeated for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ckptflow.tasks.kernels.dispatch import (  # noqa: E402
    fp8_scaled_dequant, mxfp4_dequant, mxfp4_gpt_oss, nvfp4_dequant, weight_dequant,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
INTS = {2: torch.int16, 4: torch.int32}
OUTS = (torch.bfloat16, torch.float16, torch.float32)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    ints = INTS[got.element_size()]
    g, w = got.contiguous().view(ints), want.contiguous().view(ints)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    assert bool((g[nan] == -1).all()), "NaN results must be all-ones bits"
    bad = (g != w) & ~nan
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())}/{bad.numel()} differ; first at {i}: got {g[i].item() & 0xFFFFFFFF:#x}, "
                             f"want {w[i].item() & 0xFFFFFFFF:#x}")


def special_bytes(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes with every code present at the front (zero, subnormal, NaN, ±max included)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).reshape(-1)
    n = min(256, t.numel())
    t[:n] = torch.randperm(256, generator=g)[:n].to(torch.uint8)
    return t.reshape(shape)


# ------------------------------------------------------------------ MXFP4 (gpt-oss)

def test_mxfp4_gpt_oss_matches_transformers_for_every_scale_and_byte():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # 256 E8M0 codes (0, 1, 127, 254 and 255 included) × all 256 bytes, over 2 experts × 8 rows
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(2, 8, 256, 16)
    scales = torch.arange(256, dtype=torch.uint8).repeat_interleave(16).reshape(2, 8, 256)
    for dtype in OUTS:
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        got = mxfp4_gpt_oss(blocks, scales, backend="torch", out_dtype=dtype)
        assert got.shape == (2, 256 * 32, 8)  # [E, IN, OUT]
        assert_same(got, want)


def test_mxfp4_special_scales_and_ragged_leading_shapes():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = special_bytes((3, 5, 3, 16), seed=1)
    scales = special_bytes((3, 5, 3), seed=2)
    scales[0, 0] = torch.tensor([0, 254, 255], dtype=torch.uint8)
    assert_same(mxfp4_gpt_oss(blocks, scales, backend="torch"), convert_moe_packed_tensors(blocks, scales))
    # E8M0 255 is 2^128 in transformers, not NaN: 0.5 → 2^127, 1.0 → inf, zeros stay zero
    out = mxfp4_dequant(torch.tensor([[0x21, 0x80] + [0] * 14], dtype=torch.uint8),
                        torch.tensor([255], dtype=torch.uint8), backend="torch", out_dtype=torch.float32)
    assert out[:4].tolist() == [2.0 ** 127, float("inf"), 0.0, 0.0] and str(out[3].item()) == "-0.0"
    assert not out.isnan().any()
    # E8M0 0: 2^-127 times 0.5 is 2^-128, a subnormal that must not flush
    sub = mxfp4_dequant(torch.tensor([[0x01] + [0] * 15], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8),
                        backend="torch", out_dtype=torch.float32)
    assert sub[0].item() == 2.0 ** -128


def test_mxfp4_row_chunks_equal_the_whole():
    blocks, scales = special_bytes((6, 4, 16), seed=3), special_bytes((6, 4), seed=4)
    whole = mxfp4_dequant(blocks, scales, backend="torch")
    parts = torch.cat([mxfp4_dequant(blocks[a:a + 2], scales[a:a + 2], backend="torch") for a in (0, 2, 4)])
    assert torch.equal(whole.view(torch.int16), parts.view(torch.int16))


def test_mxfp4_triton_equals_cpu_for_every_scale_and_byte():
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(256, 16, 16)
    scales = torch.arange(256, dtype=torch.uint8).reshape(256, 1).expand(256, 16).contiguous()
    for dtype in OUTS:
        assert_same(mxfp4_dequant(blocks, scales, backend="triton", out_dtype=dtype),
                    mxfp4_dequant(blocks, scales, backend="torch", out_dtype=dtype))
    small_b, small_s = special_bytes((2, 3, 2, 16), 5), special_bytes((2, 3, 2), 6)
    assert_same(mxfp4_gpt_oss(small_b, small_s, backend="triton"), mxfp4_gpt_oss(small_b, small_s, backend="torch"))


def test_mxfp4_compressed_tensors_matches_its_decompressor_for_every_scale_and_byte():
    """mxfp4-pack-quantized: `weight_packed` [R, C/2] is blocks [R, C/32, 16]. Its E8M0 255 is bf16
    inf there (not transformers' 2^128): nonzero codes → ±inf, zeros → NaN; all else is ldexp's."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor

    from .quant_fixtures import ct_mxfp4_scheme

    # row r: all 256 bytes (512 columns, 16 groups), every group scaled by E8M0 code r
    packed = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(256, 256)
    scale = torch.arange(256, dtype=torch.uint8).reshape(256, 1).expand(256, 16).contiguous()
    want = MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale},
                                            ct_mxfp4_scheme())["weight"]
    blocks = packed.reshape(256, 16, 16)
    for backend in ("torch", "triton"):
        got = mxfp4_dequant(blocks, scale, backend=backend, convention="compressed-tensors")
        assert_same(got, want)
        for dtype in (torch.float16, torch.float32):  # their bf16, then cast: exact, one rounding
            assert_same(mxfp4_dequant(blocks, scale, backend=backend, out_dtype=dtype, convention="compressed-tensors"),
                        want.to(dtype))
    # 255: the 64 zero nibbles (codes 0 and 8, low and high) NaN, the other 448 ±inf
    assert int(want[255].isnan().sum()) == 64 and int(want[255].isinf().sum()) == 448
    with pytest.raises(ValueError, match="MXFP4 convention"):
        mxfp4_dequant(blocks, scale, convention="ocp")


def test_mxfp4_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="scales shape"):
        mxfp4_dequant(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[\.\.\., G, 16\]"):
        mxfp4_dequant(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 E8M0"):
        mxfp4_dequant(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[E, OUT, G, 16\]"):
        mxfp4_gpt_oss(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))


# ------------------------------------------------------------------ NVFP4

def _ct_nvfp4(packed, scale, global_scale):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
    state = {"weight_packed": packed, "weight_scale": scale.view(torch.float8_e4m3fn),
             "weight_global_scale": global_scale}
    return NVFP4PackedCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))["weight"]


def _modelopt_nvfp4(packed, scale, scale_2, columns, dtype):
    """ModelOpt's NVFP4 dequant as its docs describe it: E2M1 (low nibble first, code 8 = +0)
    × (float32(weight_scale) × weight_scale_2), per 16 elements, in float32, then cast."""
    values = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    x = values[codes][:, :columns]
    s = scale.view(torch.float8_e4m3fn).to(torch.float32) * scale_2
    return (x * s.repeat_interleave(16, dim=1)[:, :columns]).to(dtype)


def test_nvfp4_compressed_tensors_matches_its_decompressor_for_every_scale_and_byte():
    packed = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # row r: every byte
    scale = torch.arange(256, dtype=torch.uint8).reshape(256, 1).expand(256, 32).contiguous()  # row r: code r
    for gs in (torch.tensor([2.5e-3]), torch.tensor([448.0 * 6]), torch.tensor([1e-35])):
        assert_same(nvfp4_dequant(packed, scale, gs, "compressed-tensors", backend="torch"),
                    _ct_nvfp4(packed, scale, gs))


def test_nvfp4_compressed_tensors_ragged_groups_and_row_chunks():
    packed, scale = special_bytes((7, 20), 7), special_bytes((7, 3), 8)  # C = 40: last group has 8 columns
    gs = torch.tensor([0.0123])
    got = nvfp4_dequant(packed, scale, gs, "compressed-tensors", backend="torch")
    # compressed-tensors only writes whole groups: pad the bytes to C = 48 for the reference, cut back
    padded = torch.cat([packed, torch.zeros(7, 4, dtype=torch.uint8)], dim=1)
    want = _ct_nvfp4(padded, scale, gs)[:, :40]
    assert_same(got, want)
    rows = torch.cat([nvfp4_dequant(packed[a:a + 3], scale[a:a + 3], gs, "compressed-tensors", backend="torch")
                      for a in range(0, 7, 3)])
    assert_same(rows, want)


@pytest.mark.parametrize("columns", [512, 40, 13])
def test_nvfp4_modelopt_matches_the_formula(columns):
    rows = 256
    if columns == 512:  # row r: scale code r and every byte
        packed = torch.arange(256, dtype=torch.uint8).repeat(rows, 1)
    else:  # ragged: a part group (40) and an odd count with a padding nibble (13)
        packed = special_bytes((rows, -(-columns // 2)), 9)
    scale = torch.arange(256, dtype=torch.uint8).reshape(rows, 1).expand(rows, -(-columns // 16)).contiguous()
    s2 = torch.tensor([3.1e-4])
    for dtype in OUTS:
        got = nvfp4_dequant(packed, scale, s2, "modelopt", columns=columns, backend="torch", out_dtype=dtype)
        assert_same(got, _modelopt_nvfp4(packed, scale, s2, columns, dtype))


def test_nvfp4_triton_equals_cpu():
    packed = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # every (scale code, byte) pair
    scale = torch.arange(256, dtype=torch.uint8).reshape(256, 1).expand(256, 32).contiguous()
    small_p, small_s = special_bytes((9, 24), 12), special_bytes((9, 3), 13)
    for convention in ("compressed-tensors", "modelopt"):
        for gs in (torch.tensor([2.5e-3]), torch.tensor(7.0), torch.tensor([1e30]), torch.tensor([1e-30])):
            assert_same(nvfp4_dequant(packed, scale, gs, convention, backend="triton"),
                        nvfp4_dequant(packed, scale, gs, convention, backend="torch"))
            for dtype in (torch.float16, torch.float32):
                assert_same(nvfp4_dequant(small_p, small_s, gs, convention, backend="triton", out_dtype=dtype),
                            nvfp4_dequant(small_p, small_s, gs, convention, backend="torch", out_dtype=dtype))
        odd_p, odd_s = special_bytes((5, 7), 10), special_bytes((5, 1), 11)
        assert_same(nvfp4_dequant(odd_p, odd_s, torch.tensor([0.5]), convention, columns=13, backend="triton"),
                    nvfp4_dequant(odd_p, odd_s, torch.tensor([0.5]), convention, columns=13, backend="torch"))


def test_nvfp4_rejects_mismatched_inputs():
    p, s, gs = torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="weight_scale shape"):
        nvfp4_dequant(p, torch.zeros(4, 2, dtype=torch.uint8), gs, "modelopt")
    with pytest.raises(ValueError, match="does not hold 20 columns"):
        nvfp4_dequant(p, s, gs, "modelopt", columns=20)
    with pytest.raises(ValueError, match="convention"):
        nvfp4_dequant(p, s, gs, "gptq")
    with pytest.raises(ValueError, match="global scale"):
        nvfp4_dequant(p, s, torch.tensor([1.0, 2.0]), "compressed-tensors")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        nvfp4_dequant(p, torch.zeros(4, 1), gs, "modelopt")


# ------------------------------------------------------------------ FP8 per-tensor / per-channel

def _ct_fp8(weight, scale, strategy):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    return FloatQuantizationCompressor.decompress({"weight": weight, "weight_scale": scale},
                                                  QuantizationScheme(targets=["Linear"], weights=args))["weight"]


@pytest.mark.parametrize("strategy,shape", [("tensor", (1,)), ("channel", "rows1")])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_scaled_matches_compressed_tensors(strategy, shape, scale_dtype):
    rows, cols = 37, 71  # ragged: nothing divides
    weight = special_bytes((rows, cols), 12).view(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(13)
    sshape = (rows, 1) if shape == "rows1" else shape
    scale = (torch.rand(sshape, generator=g) * 10.0 ** torch.randint(-6, 2, sshape, generator=g)).to(scale_dtype)
    want = _ct_fp8(weight, scale, strategy)  # in the scale's dtype, as compressed-tensors returns it
    assert_same(fp8_scaled_dequant(weight, scale, backend="torch", out_dtype=want.dtype), want)
    # Any output dtype: their result cast (bf16 output of an f32 scale = one rounding of the f32 product)
    assert_same(fp8_scaled_dequant(weight, scale, backend="torch"), want.to(torch.bfloat16))
    half = fp8_scaled_dequant(weight[:20], scale if strategy == "tensor" else scale[:20], backend="torch")
    assert_same(half, want.to(torch.bfloat16)[:20])


def test_fp8_modelopt_per_tensor_and_channel_vectors():
    weight = special_bytes((16, 300), 14).view(torch.float8_e4m3fn)
    scale = torch.tensor(0.0173)  # ModelOpt: F32 scalar
    assert_same(fp8_scaled_dequant(weight, scale, backend="torch"),
                (weight.to(torch.float32) * scale).to(torch.bfloat16))
    per_row = torch.rand(16) * 1e-3  # [OUT] is accepted as a per-channel scale too
    assert_same(fp8_scaled_dequant(weight, per_row, backend="torch"),
                (weight.to(torch.float32) * per_row[:, None]).to(torch.bfloat16))


def test_fp8_scaled_triton_equals_cpu():
    g = torch.Generator().manual_seed(15)
    weight = special_bytes((19, 300), 16).view(torch.float8_e4m3fn)
    for shape in ((), (1,), (19, 1), (19,)):
        for sdt in (torch.float32, torch.bfloat16, torch.float16):
            scale = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(-9, 4, shape, generator=g)).to(sdt)
            for dtype in OUTS:
                assert_same(fp8_scaled_dequant(weight, scale, backend="triton", out_dtype=dtype),
                            fp8_scaled_dequant(weight, scale, backend="torch", out_dtype=dtype))


def test_fp8_scaled_rejects_mismatched_inputs():
    w = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="per-channel"):
        fp8_scaled_dequant(w, torch.ones(8, 1))
    with pytest.raises(ValueError, match="scale must be float32"):
        fp8_scaled_dequant(w, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_scaled_dequant(torch.zeros(4, 8), torch.ones(1))


# ------------------------------------------------------------------ FP8 block scales: BF16 and E8M0

def _block_formula(weight, scale32, block):
    full = scale32.repeat_interleave(block, 0).repeat_interleave(block, 1)[:weight.shape[0], :weight.shape[1]]
    return (weight.to(torch.float32) * full).to(torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_dequant_bf16_and_e8m0_block_scales(backend):
    weight = special_bytes((300, 200), 17).view(torch.float8_e4m3fn)  # ragged against 128
    g = torch.Generator().manual_seed(18)
    bf16 = (torch.randn(3, 2, generator=g) * 1e-3).to(torch.bfloat16)
    assert_same(weight_dequant(weight, bf16, 128, backend=backend), _block_formula(weight, bf16.float(), 128))
    e8m0 = torch.tensor([[0, 254], [127, 120], [255, 1]], dtype=torch.uint8)  # 2^-127, 2^127, 1, ..., NaN
    want = _block_formula(weight, torch.tensor([[2.0 ** -127, 2.0 ** 127], [1.0, 2.0 ** -7],
                                                [float("nan"), 2.0 ** -126]]), 128)
    got_raw = weight_dequant(weight, e8m0, 128, backend=backend, scale_dtype="F8_E8M0")
    got_typed = weight_dequant(weight, e8m0.view(torch.float8_e8m0fnu), 128, backend=backend)
    for got in (got_raw, got_typed):
        assert torch.equal(got.isnan(), want.isnan())  # the E8M0-255 block is NaN throughout
        assert got[256:, :128].isnan().all()
        ok = ~want.isnan()
        assert torch.equal(got.view(torch.int16)[ok], want.view(torch.int16)[ok])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_block_strategy_is_weight_dequant(scale_dtype):
    weight = special_bytes((300, 200), 24).view(torch.float8_e4m3fn)  # ragged against 128
    scale = (torch.rand(3, 2, generator=torch.Generator().manual_seed(25)) * 1e-2).to(scale_dtype)
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True)
    want = FloatQuantizationCompressor.decompress({"weight": weight, "weight_scale": scale},
                                                  QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    assert_same(weight_dequant(weight, scale, 128, backend="torch"), want.to(torch.bfloat16))


def test_weight_dequant_refuses_other_scale_dtypes():
    w = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="F8_E8M0"):
        weight_dequant(w, torch.ones(1, 1, dtype=torch.uint8), 128)
    with pytest.raises(ValueError, match="block scales must be"):
        weight_dequant(w, torch.ones(1, 1, dtype=torch.float16), 128)


# ------------------------------------------------------------------ out=: the executor's own buffers

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_format_writes_into_a_given_out(backend):
    blocks, scales = special_bytes((2, 3, 2, 16), 19), special_bytes((2, 3, 2), 20)
    packed, nscale, gs = special_bytes((4, 7), 21), special_bytes((4, 1), 22), torch.tensor([0.25])
    weight, wscale = special_bytes((4, 9), 23).view(torch.float8_e4m3fn), torch.rand(4, 1)
    cases = [
        (lambda out: mxfp4_dequant(blocks, scales, backend=backend, out=out), (2, 3, 64)),
        (lambda out: mxfp4_gpt_oss(blocks, scales, backend=backend, out=out), (2, 64, 3)),
        (lambda out: nvfp4_dequant(packed, nscale, gs, "modelopt", columns=13, backend=backend, out=out), (4, 13)),
        (lambda out: nvfp4_dequant(packed, nscale, gs, "compressed-tensors", backend=backend, out=out), (4, 14)),
        (lambda out: fp8_scaled_dequant(weight, wscale, backend=backend, out=out), (4, 9)),
    ]
    for run, shape in cases:
        want = run(None)
        buf = torch.full(shape, 7.0, dtype=torch.bfloat16)
        assert run(buf) is buf
        assert_same(buf, want)
        with pytest.raises(ValueError, match="out must be"):
            run(torch.empty(shape[:-1] + (shape[-1] + 1,), dtype=torch.bfloat16))


def test_backend_names_are_checked():
    blocks, scales = torch.zeros(1, 1, 16, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="backend must be one of"):
        mxfp4_dequant(blocks, scales, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        nvfp4_dequant(torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8), torch.tensor([1.0]),
                      "modelopt", backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_scaled_dequant(torch.zeros(1, 8, dtype=torch.float8_e4m3fn), torch.ones(1), backend="numpy")

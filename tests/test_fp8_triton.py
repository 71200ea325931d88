"""Bit-exact tests for the block-wise FP8 dequant Triton kernel against the pure-torch reference.

Without a GPU, the kernel runs in the Triton CPU interpreter, so TRITON_INTERPRET must be set
before triton is imported.
"""

import os

import torch

if not torch.cuda.is_available():  # conftest does this too; repeated for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from ckptflow.tasks.kernels.fp8_triton import (  # noqa: E402
    BF16_NAN_BITS,
    torch_reference_dequant,
    triton_weight_dequant,
)

# The interpreter runs on numpy, which warns on inf and NaN products. Those are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in multiply:RuntimeWarning")

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _torch_bf16_nan_bits() -> set[int]:
    nan = torch.full((64,), float("nan"))
    return {v & 0xFFFF for v in (-nan).to(torch.bfloat16).view(torch.int16).tolist()} | {
        v & 0xFFFF for v in nan.to(torch.bfloat16).view(torch.int16).tolist()
    }


# torch's bf16 NaN bits depend on the CPU backend: 0xFFFF with AVX2/AVX512, 0x7FC0 for scalar
# code. On hosts where torch does not give the kernel's 0xFFFF, only the NaN positions can match.
STRICT_BF16_NAN = _torch_bf16_nan_bits() == {BF16_NAN_BITS}


def assert_bit_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.device == ref.device
    got, want = out.view(BITS[out.dtype]), ref.view(BITS[ref.dtype])
    if out.dtype == torch.bfloat16 and not STRICT_BF16_NAN:
        want = torch.where(ref.isnan(), torch.full_like(want, BF16_NAN_BITS - 0x10000), want)
    bad = got != want
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
                             f"got {got[idx].item() & 0xFFFFFFFF:#x}, want {want[idx].item() & 0xFFFFFFFF:#x}")


def make_inputs(shape: tuple[int, ...], block: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes over all 256 codes (NaN and +-448 included), and scales with mixed signs and magnitudes."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    s_shape = (*shape[:-2], math.ceil(shape[-2] / block), math.ceil(shape[-1] / block))
    scale = torch.randn(s_shape, generator=g) * 10.0 ** torch.randint(-40, 39, s_shape, generator=g)
    return weight, scale.float()


def check(weight: torch.Tensor, scale: torch.Tensor, block: int, out_dtype: torch.dtype) -> torch.Tensor:
    out = triton_weight_dequant(weight, scale, block, out_dtype=out_dtype)
    ref = torch_reference_dequant(weight, scale, block, out_dtype)
    assert_bit_equal(out, ref)
    return ref


def test_decode_matches_torch_for_all_256_codes() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    out = triton_weight_dequant(codes, torch.ones(1, 1), out_dtype=torch.float32)
    want = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(out.isnan(), want.isnan())
    assert out.isnan().sum() == 2  # 0x7F and 0xFF
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))  # NaN payloads included


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("shape", "block"),
    [((300, 260), 128), ((300, 260), 64), ((1, 1), 128), ((129, 127), 128), ((128, 128), 128),
     ((3, 130, 200), 128), ((3, 130, 200), 64), ((70, 50), 96), ((37, 41), 3)],
)
def test_random_codes_bit_exact(shape: tuple[int, ...], block: int, out_dtype: torch.dtype) -> None:
    weight, scale = make_inputs(shape, block, seed=shape[-1] + block)
    check(weight, scale, block, out_dtype)


def test_deepseek_sized_weight() -> None:
    weight, scale = make_inputs((576, 7168), 128)  # kv_a_proj shape, about 3 s in the interpreter
    check(weight, scale, 128, torch.bfloat16)


def test_uint8_view_is_accepted() -> None:
    weight, scale = make_inputs((65, 130), 64)
    out8 = triton_weight_dequant(weight.view(torch.uint8), scale, 64)
    assert_bit_equal(out8, triton_weight_dequant(weight, scale, 64))
    assert_bit_equal(out8, torch_reference_dequant(weight, scale, 64))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "scale_value",
    [1.0, -1.0, 0.0, -0.0, 1e-30, -1e-36, 1e-40, 1e30, -1e36, 65504.0 / 448, float("inf"), float("nan"),
     # 0x7F7FC000 is below FLT_MAX, but its bf16 rounding overflows to inf
     torch.tensor(0x7F7FC000, dtype=torch.int32).view(torch.float32).item()],
)
def test_special_codes_and_scales(scale_value: float, out_dtype: torch.dtype) -> None:
    # +-448 (0x7E/0xFE), NaN (0x7F/0xFF), +-0, subnormals (0x01/0x87), 1.0, and all codes once
    special = torch.tensor([0x7E, 0xFE, 0x7F, 0xFF, 0x00, 0x80, 0x01, 0x87, 0x38, 0xB8], dtype=torch.uint8)
    codes = torch.cat([special, torch.arange(256, dtype=torch.uint8)]).repeat(2, 1)
    scale = torch.tensor([[scale_value]], dtype=torch.float32)
    check(codes, scale, 512, out_dtype)


def test_overflow_and_subnormal_outputs_are_exercised() -> None:
    # block_size 1 gives every element its own scale, which is the per-element (gather) scale path
    codes = torch.arange(256, dtype=torch.uint8).view(1, 256).repeat(4, 1)
    big = torch.tensor(0x7F7FC000, dtype=torch.int32).view(torch.float32).item()
    scale = torch.tensor([[big], [1e-38], [1e30], [1e-30]], dtype=torch.float32).expand(4, 256).contiguous()
    out_bf = check(codes, scale, 1, torch.bfloat16)
    out_h = check(codes, scale, 1, torch.float16)
    assert out_bf[0].isinf().any()  # finite fp32 products that round up to inf in bf16
    assert ((out_bf[1].abs() < 2.0**-126) & (out_bf[1] != 0)).any()  # bf16 subnormals
    assert out_h[2].isinf().any() and (out_h[3][codes[3] & 0x7F != 0] == 0).any()  # fp16 overflow, underflow


def test_round_half_to_even() -> None:
    # Power-of-two weights keep the scale's bits exactly, so these scales are exact rounding ties:
    # bf16 ties at 2^-8 ulps, fp16 ties at 2^-11 ulps, fp16 subnormal ties at 2^-25, and 65520.
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20,
            2**-25, 3 * 2**-25, 5 * 2**-25, 2**-25 + 2**-40, 65520.0, 65519.0, 2**-15 + 2**-25]
    codes = torch.tensor([[0x38, 0xB8, 0x40, 0x08, 0x30]], dtype=torch.uint8).repeat(len(ties), 1)
    scale = torch.tensor(ties, dtype=torch.float32)[:, None].expand(codes.shape).contiguous()
    for out_dtype in (torch.bfloat16, torch.float16):
        check(codes, scale, 1, out_dtype)


def test_empty_weight() -> None:
    out = triton_weight_dequant(torch.empty(0, 5, dtype=torch.float8_e4m3fn), torch.empty(0, 1))
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16


def _w(shape: tuple[int, ...] = (4, 4), dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"weight": _w(dtype=torch.float8_e5m2)}, TypeError, "only e4m3fn block scales"),
        ({"weight": _w(dtype=torch.float16)}, TypeError, "got torch.float16"),
        ({"weight": [[0]]}, TypeError, "must be torch.Tensor"),
        ({"scale_inv": torch.ones(1, 1, dtype=torch.float64)}, TypeError,
         "scale_inv must be torch.float32, got torch.float64"),
        ({"out_dtype": torch.int8}, TypeError, "out_dtype"),
        ({"weight": _w((4,)), "scale_inv": torch.ones(1)}, ValueError, "got 1-D"),
        ({"weight": _w((1, 2, 4, 4)), "scale_inv": torch.ones(1, 2, 1, 1)}, ValueError, "got 4-D"),
        ({"weight": _w((4, 8))[:, ::2], "scale_inv": torch.ones(1, 1)}, ValueError, "weight must be contiguous"),
        ({"scale_inv": torch.ones(2, 2)}, ValueError, r"expected \(1, 1\), got \(2, 2\)"),
        ({"weight": _w((2, 200, 4)), "scale_inv": torch.ones(2, 1, 1), "block_size": 128}, ValueError,
         r"expected \(2, 2, 1\)"),
        ({"scale_inv": torch.ones(1, 1, device="meta")}, ValueError, "same device"),
        ({"block_size": 0}, ValueError, "block_size must be positive, got 0"),
        ({"block_size": -128}, ValueError, "block_size must be positive"),
        ({"block_size": 128.0}, TypeError, "block_size must be an int"),
    ],
)
def test_validation_errors(kwargs: dict, exc: type[Exception], match: str) -> None:
    args = {"weight": _w(), "scale_inv": torch.ones(1, 1), "block_size": 128, "out_dtype": torch.bfloat16} | kwargs
    with pytest.raises(exc, match=match):
        triton_weight_dequant(args["weight"], args["scale_inv"], args["block_size"], out_dtype=args["out_dtype"])


def test_cpu_without_interpreter_is_refused() -> None:
    import subprocess
    import sys

    code = ("import torch; from ckptflow.tasks.kernels.fp8_triton import triton_weight_dequant as f\n"
            "try: f(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(1, 1))\n"
            "except RuntimeError as e: print('refused:', e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert "refused:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("shape", "block"), [((576, 7168), 128), ((3, 130, 200), 64), ((37, 41), 3)])
def test_cuda_matches_cpu_reference(shape: tuple[int, ...], block: int, out_dtype: torch.dtype) -> None:
    weight, scale = make_inputs(shape, block)
    out = triton_weight_dequant(weight.cuda(), scale.cuda(), block, out_dtype=out_dtype)
    assert out.device.type == "cuda"
    assert_bit_equal(out.cpu(), torch_reference_dequant(weight, scale, block, out_dtype))

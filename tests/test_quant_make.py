"""The weight quantizers (tasks/kernels/quant_fp8.py, quant_fp4.py) against llm-compressor itself.

"llmcompressor-cpu" rounding: bit for bit what llm-compressor 0.14's `ModelFreePtqConverter` (the
per-shard step of `model_free_ptq`) writes on the CPU, for FP8_BLOCK, FP8_DYNAMIC, NVFP4A16 and
MXFP4A16, on bfloat16, float16 and float32 weights with ragged shapes, all-zero fused groups,
subnormals, ±max and exact E2M1 ties; the NVFP4 global scale and E2M1 rounding also against
compressed-tensors' own `generate_gparam` and `cast_to_fp4` + `pack_fp4_to_uint8`.
"fp32" rounding (the default; llm-compressor's CUDA path): against the formulas written below.

The reference runs once per module (tests/llmc_reference.py): in this process when llmcompressor
is importable, else under CKPTFLOW_LLMC_PYTHON (a venv with llmcompressor==0.14.0.1). Without
either the reference tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import os
import sys
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptflow.tasks.kernels.quant_common import block_amax, tensor_amax
from ckptflow.tasks.kernels.quant_fp4 import e2m1_codes, mxfp4_quantize, nvfp4_global_scale, nvfp4_quantize
from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize, fp8_channel_quantize

from . import llmc_reference
from .helpers import ROOT, llmc_python

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
SCHEMES = ("FP8_BLOCK", "FP8_DYNAMIC", "NVFP4A16", "MXFP4A16")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # llm-compressor's own NVFP4 groups here
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.5, 0.0, 0.1]


def layer(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """One decoder layer's Linear weights, shapes ragged for 128×128 blocks, every special case."""
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)

    def rnd(r: int, c: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(r, c, generator=g) * std).to(dtype)

    q, k, v = rnd(200, 320), rnd(72, 320), rnd(72, 320, 0.05)
    v[5, 7] = 0.5  # the q/k/v group's amax sits in a partner
    q[:128, :128] = 0  # a whole FP8 block, NVFP4 and MXFP4 groups of zeros
    ties = torch.tensor(TIES + [-t for t in TIES], dtype=torch.float32)  # 32 values, amax 5.5 < 6
    o = ties.repeat(320, 7)
    o[:, ::32] = 6.0  # each MXFP4 group's amax is 6: scale 1, so the ties stay exact ties
    o *= torch.linspace(1, 3, 320).reshape(-1, 1).round()  # rows ×1, ×2, ×3: ties at other scales too
    down = (torch.randn(256, 96, generator=g) * finfo.tiny).to(dtype)  # normal/subnormal boundary
    down[128:] = (down[128:].to(torch.float32) * 2.0 ** -5).to(dtype)  # subnormals only
    extreme = rnd(160, 64)
    big = 1.5 * 2.0 ** (127 if finfo.bits != 16 or dtype == torch.bfloat16 else 15)  # largest MXFP4 takes
    extreme[3, :4] = torch.tensor([big, -big, finfo.tiny, -finfo.tiny], dtype=torch.float32).to(dtype)
    largest = rnd(130, 32)
    largest[129, 31], largest[0, 0] = finfo.max, -finfo.max  # MXFP4 refuses these (test below)
    return {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v, "self_attn.o_proj": o.to(dtype),
            "mlp.gate_proj": torch.zeros(96, 256, dtype=dtype), "mlp.up_proj": torch.zeros(96, 256, dtype=dtype),
            "mlp.down_proj": down, "mlp.extreme_proj": extreme, "mlp.largest_proj": largest}


def weights(scheme: str) -> dict[str, torch.Tensor]:
    """`model.layers.{i}.…weight`, one layer per dtype (fused groups never cross layers)."""
    return {f"model.layers.{i}.{name}.weight": w for i, dt in enumerate(DTYPES.values())
            for name, w in layer(dt, seed=i).items() if not (scheme == "MXFP4A16" and name == "mlp.largest_proj")}


def scalar_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    amax = torch.cat([torch.rand(600, generator=g) * 10.0 ** torch.randint(-30, 30, (600,), generator=g),
                      torch.tensor([0.0, 1.0, 6.0, 448.0, 2688.0, 1e-38, 1e-40, 3e38])]).abs()
    y = torch.cat([torch.randn(8192, generator=g) * 3, torch.tensor(TIES + [-t for t in TIES] + [6, -6, 7, -9, -0.0])])
    y = y[: y.numel() // 2 * 2]
    return {f"{fn}::{dt}": x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).reshape(1, -1)
            for dt, dtype in DTYPES.items()
            for fn, x in (("generate_gparam", amax), ("cast_to_fp4", y))}


def run_reference(tensors: dict[str, torch.Tensor], tmp: os.PathLike) -> dict[str, torch.Tensor]:
    python = llmc_python()
    if python == sys.executable:
        return llmc_reference.reference_all(tensors)
    src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file(tensors, src)
    run = subprocess.run([python, str(ROOT / "tests" / "llmc_reference.py"), src, dst],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(dst)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    w = {scheme: weights(scheme) for scheme in SCHEMES}
    tensors = {f"{scheme}::{name}": t for scheme in SCHEMES for name, t in w[scheme].items()}
    tensors.update(scalar_inputs())
    return w, run_reference(tensors, tmp_path_factory.mktemp("llmc"))


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    g, w = got.contiguous().view(ints), want.contiguous().view(ints)
    bad = g != w
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} differ, first at {i}: "
                             f"got {got[i]}, want {want[i]}")


def fused_amax(w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The amax of `name`'s fused group, folded over 64-row slices as the stage's pre-pass folds it."""
    prefix, module = name.rsplit(".", 1)[0].rsplit(".", 1)
    group = next((grp for grp in FUSED if module in grp), (module,))
    amaxes = [tensor_amax(s) for m in group for s in w[f"{prefix}.{m}.weight"].split(64)]
    return torch.stack(amaxes).amax()


def ours(scheme: str, name: str, w: dict[str, torch.Tensor], rounding: str = "llmcompressor-cpu"
         ) -> dict[str, torch.Tensor]:
    x = w[name]
    if scheme == "FP8_BLOCK":
        q, s = fp8_block_quantize(x, rounding)
        return {"weight": q, "weight_scale": s}
    if scheme == "FP8_DYNAMIC":
        q, s = fp8_channel_quantize(x, rounding)
        return {"weight": q, "weight_scale": s}
    if scheme == "NVFP4A16":
        gs = nvfp4_global_scale(fused_amax(w, name))
        q, s = nvfp4_quantize(x, gs, rounding)
        return {"weight_packed": q, "weight_scale": s, "weight_global_scale": gs.reshape(1)}
    q, s = mxfp4_quantize(x, rounding)
    return {"weight_packed": q, "weight_scale": s}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_llmcompressor_cpu_rounding_is_llm_compressor_bit_for_bit(ref, scheme):
    all_w, out = ref
    w = all_w[scheme]
    written = {k.split("::", 1)[1] for k in out if k.startswith(scheme + "::")}
    expected = set()
    for name in w:
        got = ours(scheme, name, w)
        for suffix, t in got.items():
            key = name[: -len("weight")] + suffix
            expected.add(key)
            same_bits(t, out[f"{scheme}::{key}"], f"{scheme} {key}")
    assert written == expected  # llm-compressor writes exactly these tensors, no more


@pytest.mark.parametrize("dt", DTYPES)
def test_global_scale_and_e2m1_are_compressed_tensors_functions(ref, dt):
    _, out = ref
    amax = scalar_inputs()[f"generate_gparam::{dt}"].reshape(-1)
    got = torch.stack([nvfp4_global_scale(a) for a in amax])
    same_bits(got, out[f"generate_gparam::{dt}"], f"generate_gparam {dt}")
    if DTYPES[dt] == torch.bfloat16:  # a reciprocal then a product: not one division, on some amax
        one_division = (2688.0 / amax.float()).to(torch.bfloat16).float()
        assert bool(((one_division != got) & (amax > 1e-30) & (amax < 1e30)).any())
    y = scalar_inputs()[f"cast_to_fp4::{dt}"]
    codes = e2m1_codes(y)
    same_bits(codes[:, 0::2] | (codes[:, 1::2] << 4), out[f"cast_to_fp4::{dt}"], f"cast_to_fp4 {dt}")


# ---------------------------------------------------------------- the default: one rounding, in float32

def fp8_formula(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile by tile: scale = amax/448 in x's dtype (0 → eps), codes = e4m3(f32(x) / f32(scale)).
    A tile of (1, cols) is a row: those go all at once (rows are independent)."""
    rows, cols = x.shape
    br, bc = block
    if (br, bc) == (1, cols):
        s = (x.abs().amax(dim=1, keepdim=True) / 448.0).to(x.dtype)
        s = torch.where(s == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype), s)
        return (x.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn), s
    scale = torch.empty((-(-rows // br), -(-cols // bc)), dtype=x.dtype)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = (tile.abs().max() / 448.0).to(x.dtype)
            s = torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype) if s == 0 else s
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = \
                (tile.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_formula(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude, ties to the even code (the one with mantissa bit 0), sign of y."""
    a = y.abs().clamp(max=6.0).reshape(-1, 1)
    dist = (a - E2M1).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    idx = torch.where(tied.sum(1) > 1, (tied & (torch.arange(8) % 2 == 0)).float().argmax(1), dist.argmin(1))
    return (idx.to(torch.uint8) | ((y.reshape(-1) < 0).to(torch.uint8) << 3)).reshape(y.shape)


@pytest.mark.parametrize("dt", DTYPES)
def test_fp32_rounding_is_the_single_rounding_formula(dt):
    w = layer(DTYPES[dt], seed=11)
    for name, x in w.items():
        q, s = fp8_block_quantize(x)
        fq, fs = fp8_formula(x, (128, 128))
        same_bits(s, fs, "fp8-block scale")
        same_bits(q, fq, "fp8-block codes")
        q, s = fp8_channel_quantize(x)
        fq, fs = fp8_formula(x, (1, x.shape[1]))
        same_bits(s, fs, "fp8-channel scale")
        same_bits(q, fq, "fp8-channel codes")
        # NVFP4 / MXFP4 codes from the scales the kernel wrote: one float32 division, then E2M1
        gs = nvfp4_global_scale(tensor_amax(x))
        packed, s = nvfp4_quantize(x, gs)
        y = x.float().reshape(x.shape[0], -1, 16) / (s.float() / gs)[:, :, None]
        codes = e2m1_formula(y).reshape(x.shape)
        same_bits(packed, codes[:, 0::2] | (codes[:, 1::2] << 4), "nvfp4 codes")
        if name == "mlp.largest_proj":
            with pytest.raises(ValueError, match="E8M0 scale would overflow"):
                mxfp4_quantize(x)
            continue
        packed, e = mxfp4_quantize(x)
        y = x.float().reshape(x.shape[0], -1, 32) / torch.exp2(e.float() - 127)[:, :, None]
        codes = e2m1_formula(y).reshape(x.shape)
        same_bits(packed, codes[:, 0::2] | (codes[:, 1::2] << 4), "mxfp4 codes")


def test_fp32_and_cpu_rounding_differ_where_llm_compressor_paths_do():
    """FP8: the BF16 division rounds twice (CPU) where float32 rounds once (CUDA): a few % of codes."""
    x = (torch.randn(512, 512, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    for fn in (fp8_block_quantize, fp8_channel_quantize):
        a, sa = fn(x, "fp32")
        b, sb = fn(x, "llmcompressor-cpu")
        same_bits(sa, sb, "scales do not depend on the rounding")
        frac = float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean())
        assert 0.005 < frac < 0.1, frac
    gs = nvfp4_global_scale(tensor_amax(x))  # NVFP4 divides in float32 on both paths
    same_bits(nvfp4_quantize(x, gs, "fp32")[0], nvfp4_quantize(x, gs, "llmcompressor-cpu")[0], "nvfp4")


# ---------------------------------------------------------------- slices, zeros, refusals

def test_row_slices_give_the_rows_of_the_whole():
    x = (torch.randn(300, 224, generator=torch.Generator().manual_seed(5)) * 0.1).to(torch.bfloat16)
    whole = fp8_block_quantize(x)
    parts = [fp8_block_quantize(t) for t in x.split(128)]  # the stage's 128-row tiles
    same_bits(torch.cat([p[0] for p in parts]), whole[0], "fp8-block codes")
    same_bits(torch.cat([p[1] for p in parts]), whole[1], "fp8-block scales")
    same_bits(torch.cat([block_amax(t) for t in x.split(128)]), block_amax(x), "block amax")
    gs = nvfp4_global_scale(torch.stack([tensor_amax(t) for t in x.split(7)]).amax())
    same_bits(gs, nvfp4_global_scale(tensor_amax(x)), "global scale from folded slices")
    for fn in (fp8_channel_quantize, lambda t: nvfp4_quantize(t, gs), mxfp4_quantize):
        whole = fn(x)
        parts = [fn(t) for t in x.split(37)]
        for i in range(2):
            same_bits(torch.cat([p[i] for p in parts]), whole[i], "row slices")


@pytest.mark.parametrize("dt", sorted(DTYPES))
def test_amax_on_the_bits_is_compressed_tensors_two_reductions(dt):
    """tensor_amax and block/group amax read |w| off the bits; they equal the observer's amin/amax
    then max(|min(w, 0)|, max(w, 0)) (written here in torch), on every sign, -0.0, subnormals, the
    dtype's max, inf; a NaN anywhere makes the amax NaN."""
    dtype = DTYPES[dt]
    finfo = torch.finfo(dtype)
    g = torch.Generator().manual_seed(3)

    def reference(x: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
        lo = torch.clamp(x.amin(dim=dim) if dim else x.min(), max=0)
        hi = torch.clamp(x.amax(dim=dim) if dim else x.max(), min=0)
        return torch.maximum(lo.abs(), hi.abs())

    cases = [torch.randn(256, 160, generator=g).to(dtype), -torch.rand(256, 160, generator=g).to(dtype),
             torch.full((256, 160), -0.0, dtype=dtype)]
    special = cases[0].clone()
    special[0, :4] = torch.tensor([-finfo.max, finfo.tiny / 4, -finfo.tiny / 2, -0.0], dtype=dtype)
    special[200, 3] = -float("inf")
    cases.append(special)
    for x in cases:
        same_bits(tensor_amax(x), reference(x), "tensor amax")
        tiles = torch.nn.functional.pad(x, (0, 96)).reshape(2, 128, 2, 128)  # ragged: zeros change no amax
        same_bits(block_amax(x), reference(tiles, (1, 3)), "block amax")
    nan = cases[0].clone()
    nan[17, 5] = float("nan")
    assert tensor_amax(nan).isnan() and block_amax(nan).isnan().sum() == 1


def test_zero_weights_never_make_nan_or_inf():
    for dtype in DTYPES.values():
        x = torch.zeros(130, 64, dtype=dtype)
        q, s = fp8_block_quantize(x)
        assert not q.view(torch.uint8).any() and bool((s == torch.finfo(dtype).eps).all())
        gs = nvfp4_global_scale(tensor_amax(x))
        assert gs.dtype == torch.float32 and gs.shape == () and float(gs) == 1.0
        packed, s = nvfp4_quantize(x, gs)
        assert not packed.any() and bool((s.float() == 0.125).all())
        packed, e = mxfp4_quantize(x)  # scale 2^-127 (code 0); float16 underflows it to 0 → eps 1 (code 127)
        assert not packed.any() and bool((e == (127 if dtype == torch.float16 else 0)).all())


def test_bad_input_is_refused_with_a_value_error():
    x = torch.randn(4, 64)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fp8_block_quantize(bad)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        nvfp4_quantize(bad, torch.tensor(1.0))
    with pytest.raises(ValueError, match="rounding"):
        fp8_channel_quantize(x, "cuda")
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_quantize(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.randn(4, 40), torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32 global scale"):
        nvfp4_quantize(x, torch.tensor(1.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quantize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        mxfp4_quantize(torch.zeros(2, 32, dtype=torch.float64))


def test_small_chunks_on_the_thread_pool_give_the_same_bytes(monkeypatch):
    """The kernels run row spans of CHUNK_ELEMENTS on threads: tiny spans (many, ragged) change nothing."""
    from ckptflow.tasks.kernels import quant_common

    x = (torch.randn(333, 320, generator=torch.Generator().manual_seed(9)) * 0.1).to(torch.bfloat16)
    gs = nvfp4_global_scale(tensor_amax(x))
    fns = [fp8_block_quantize, fp8_channel_quantize, lambda t: nvfp4_quantize(t, gs), mxfp4_quantize,
           lambda t: fp8_block_quantize(t, "llmcompressor-cpu"), lambda t: mxfp4_quantize(t, "llmcompressor-cpu")]
    whole = [fn(x) for fn in fns]
    monkeypatch.setattr(quant_common, "CHUNK_ELEMENTS", 700)  # 2 rows a span: 167 spans
    for fn, want in zip(fns, whole):
        got = fn(x)
        for g, w in zip(got, want):
            same_bits(g, w, "chunked")

"""E2M1 (FP4) formats → BF16: gpt-oss MXFP4 and NVFP4 (compressed-tensors and ModelOpt conventions).

Both pack two E2M1 codes per byte, low nibble first (element 2k in bits 0..3, 2k+1 in 4..7),
and scale a group of elements with one 8-bit code: MXFP4 an E8M0 exponent per 32 elements,
NVFP4 an FP8 e4m3 scale per 16 elements (times a per-tensor float32). So a byte's two outputs
depend only on (scale code, byte): 65536 pairs. The CPU path builds that table with the
reference's own torch ops and gathers one 4-byte pair per input byte (see `lut.py`).

References (read, not copied), and what each computes:
- MXFP4, transformers `integrations/mxfp4.convert_moe_packed_tensors`: an out_dtype table of the
  16 E2M1 values (code 8 is -0.0), then `torch.ldexp(v, scale - 127)` into out_dtype, i.e. the
  exact `v * 2**(s - 127)` (ldexp shifts the exponent; no 2**x factor is formed) rounded once.
  E8M0 0 → 2^-127 (results are subnormals, kept), 254 → 2^127, and 255 (NaN in the OCP spec) is
  treated as 2^128: ±0.5 → ±2^127, larger codes overflow to ±inf, zeros stay ±0, no NaN at all.
  This module returns the same.
- MXFP4 compressed-tensors (`compressors/mxfp4`, mxfp4-pack-quantized): `weight_packed` [R, C/2]
  unpacked to bf16 (code 8 is -0.0), `weight_scale` uint8 E8M0 → `2.0 ** bf16(s - 127)` in
  bf16, product in bf16. Codes 0..254 give the bits of the ldexp above; 255 differs: 2^128 is
  inf in bf16, so nonzero codes become ±inf and zero codes NaN (`convention="compressed-tensors"`).
- NVFP4 compressed-tensors (`compressors/nvfp4`): E2M1 → bf16 (code 8 is -0.0), the FP8
  scale → bf16, `scale / weight_global_scale` (float32 when the global scale has a dimension,
  as checkpoints store it, [1]), product in that dtype, cast to bf16. The global scale *divides*.
- NVFP4 ModelOpt (`qtensor/nvfp4_tensor.NVFP4QTensor.dequantize`): E2M1 → float32 (code 8 is
  +0.0 there), `float32(weight_scale) * weight_scale_2` (multiplies), product in float32, cast.
Every NaN result is written as all-ones bits (`lut.canonical_nan`); torch's own NaN payloads
depend on the element's position in its vector loop.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ckptflow.tasks.kernels.fp8_cpu import _index_buffer
from ckptflow.tasks.kernels.lut import (
    STEP_ELEMENTS, canonical_nan, gather_scaled_pairs, int_view, out_tensor, pair_table, parallel_rows,
)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "torch", "triton")
CONVENTIONS = ("compressed-tensors", "modelopt")
MX_CONVENTIONS = ("transformers", "compressed-tensors")  # who MXFP4's E8M0 255 follows
_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_SIGNED = _MAG + [-v for v in _MAG]  # transformers and compressed-tensors: code 8 is -0.0
E2M1_MODELOPT = _MAG + [0.0] + [-v for v in _MAG[1:]]  # ModelOpt's table: code 8 is +0.0
_PAIR_INT = {2: torch.int32, 4: torch.int64}


def _want_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _check_out(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


# ---------------------------------------------------------------- MXFP4 (gpt-oss)

def check_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Shape/dtype checks; returns `scales` as uint8 E8M0 codes."""
    _check_out(out_dtype)
    if blocks.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks must be uint8 (U8), got {blocks.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks must be [..., G, 16] (32 E2M1 codes per group), got {list(blocks.shape)}")
    if scales.dtype == torch.float8_e8m0fnu:
        scales = scales.view(torch.uint8)
    if scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 scales must be uint8 E8M0 (U8 or F8_E8M0), got {scales.dtype}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"MXFP4 scales shape {list(scales.shape)} does not match blocks {list(blocks.shape)} "
                         f"(expected {list(blocks.shape[:-1])})")
    if blocks.device != scales.device:
        raise ValueError(f"MXFP4 blocks and scales are on different devices ({blocks.device}, {scales.device})")
    return scales


def _check_mx_convention(convention: str) -> None:
    if convention not in MX_CONVENTIONS:
        raise ValueError(f"MXFP4 convention must be one of {', '.join(MX_CONVENTIONS)}, got {convention!r}")


@functools.lru_cache(maxsize=None)
def mxfp4_values(out_dtype: torch.dtype, convention: str = "transformers") -> torch.Tensor:
    """[256 E8M0 codes, 16 nibbles] results, with the convention's own op sequence."""
    _check_mx_convention(convention)
    codes = torch.arange(256, dtype=torch.int32).reshape(256, 1) - 127
    if convention == "compressed-tensors":  # bf16 E2M1 × bf16 2**(s-127), then the output dtype
        x = torch.tensor(E2M1_SIGNED, dtype=torch.bfloat16).reshape(1, 16)
        return canonical_nan((x * 2.0 ** codes.to(torch.bfloat16)).to(out_dtype))
    lut = torch.tensor(E2M1_SIGNED, dtype=out_dtype)
    values = lut[torch.arange(16).repeat(256, 1)]
    torch.ldexp(values, codes, out=values)
    return canonical_nan(values)


@functools.lru_cache(maxsize=None)
def mxfp4_table(out_dtype: torch.dtype, convention: str = "transformers") -> np.ndarray:
    """(E8M0 code << 8 | byte) → the byte's two outputs."""
    return pair_table(mxfp4_values(out_dtype, convention))


@functools.lru_cache(maxsize=None)
def mxfp4_nibble_tables(out_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(E8M0 code << 8 | byte) → the low nibble's output, and the high nibble's, as raw bits."""
    bits = int_view(mxfp4_values(out_dtype))
    byte = np.arange(256)
    return bits[:, byte & 15].reshape(-1).copy(), bits[:, byte >> 4].reshape(-1).copy()


def _gpt_oss_expert(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray, out_dtype: torch.dtype) -> None:
    """One expert straight into the transposed layout: blocks [OUT, G, 16], scales [OUT, G],
    out int bits [G*32, OUT]. Byte column j of the transposed bytes makes output rows 2j (its
    low nibbles) and 2j+1 (its high nibbles): transposing the bytes costs a quarter of
    transposing the BF16 result."""
    rows, groups, _ = blocks.shape
    bytes_t = np.ascontiguousarray(blocks.reshape(rows, groups * 16).T)  # [IN/2, OUT]
    scales_t = np.ascontiguousarray(scales.T)  # [G, OUT]
    lo_table, hi_table = mxfp4_nibble_tables(out_dtype)
    pairs = out.reshape(groups * 16, 2, rows)

    def work(a: int, b: int) -> None:  # byte rows a..b, whole groups of 16
        idx = _index_buffer((b - a) * rows, np.uint16).reshape(b - a, rows)
        idx.reshape(-1, 16, rows)[...] = scales_t[a // 16: b // 16, None, :]
        np.left_shift(idx, 8, out=idx)
        np.bitwise_or(idx, bytes_t[a:b], out=idx)
        np.take(lo_table, idx, out=pairs[a:b, 0])
        np.take(hi_table, idx, out=pairs[a:b, 1])

    step = max(16, (STEP_ELEMENTS // max(rows, 1)) // 16 * 16)
    parallel_rows(groups, 16 * rows, lambda g0, g1: work(16 * g0, 16 * g1), max_step=max(1, step // 16))


def _on_cpu(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor:
    """Where a table path writes: `out` itself when everything is on the CPU, else a CPU scratch."""
    return out_tensor(out if device.type == "cpu" else None, shape, dtype, torch.device("cpu"))


def _finish(res: torch.Tensor, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return res
    return res.to(device) if out is None else out.copy_(res)


def torch_mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                        out: torch.Tensor | None = None, convention: str = "transformers") -> torch.Tensor:
    scales = check_mxfp4(blocks, scales, out_dtype)
    _check_mx_convention(convention)
    *lead, groups, _ = blocks.shape
    res = _on_cpu(out, (*lead, groups * 32), out_dtype, blocks.device)
    if res.numel():
        # rows of G groups (not rows of one group): numpy's loops run long, not 16 wide
        packed = blocks.detach().cpu().contiguous().numpy().reshape(-1, groups * 16)
        codes = scales.detach().cpu().contiguous().numpy().reshape(-1, groups)
        pairs = res.view(_PAIR_INT[res.element_size()]).numpy().reshape(-1, groups * 16)
        gather_scaled_pairs(packed, codes, 16, mxfp4_table(out_dtype, convention), pairs)
    return _finish(res, out, blocks.device)


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, *, backend: str = "auto",
                  out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
                  convention: str = "transformers") -> torch.Tensor:
    """MXFP4 `blocks` uint8 [..., G, 16] with E8M0 `scales` uint8 [..., G] → out_dtype [..., G*32].

    out[..., 32g + 2k] = e2m1(blocks[..., g, k] & 15) * 2**(scales[..., g] - 127), and 2k+1 the
    high nibble, rounded once to out_dtype: the same bits as transformers before its transpose.
    Scale 255 (NaN in the OCP spec): convention "transformers" takes it as 2^128 (±0.5 → ±2^127,
    larger → ±inf, zeros stay zero); "compressed-tensors" as its bf16 inf (nonzero codes → ±inf,
    zeros → NaN). A compressed-tensors `weight_packed` [R, C/2] is `blocks` [R, C/32, 16].
    Any leading range (rows, experts) works on its own. `out`: a contiguous tensor to write
    into. Raises ValueError on a shape or dtype mismatch.
    """
    scales = check_mxfp4(blocks, scales, out_dtype)
    _check_mx_convention(convention)
    if out is not None:
        out_tensor(out, (*blocks.shape[:-2], blocks.shape[-2] * 32), out_dtype, blocks.device)
    if _want_backend(backend, blocks.device) == "triton":
        from ckptflow.tasks.kernels.fp4_triton import triton_mxfp4_dequant

        return triton_mxfp4_dequant(blocks, scales, out_dtype=out_dtype, out=out, convention=convention)
    return torch_mxfp4_dequant(blocks, scales, out_dtype, out, convention)


def mxfp4_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor, *, backend: str = "auto",
                  out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """What transformers' `convert_moe_packed_tensors(blocks, scales)` returns, bit for bit and
    in its layout: gpt-oss `*_blocks` [E, OUT, G, 16] → [E, G*32, OUT] (`gate_up_proj` comes out
    [E, IN, OUT]). Experts are independent, so any expert range can be converted alone (that
    is how to stream it: whole experts per chunk). `out`: a contiguous tensor to write into."""
    if blocks.dim() != 4:
        raise ValueError(f"gpt-oss MXFP4 blocks must be [E, OUT, G, 16], got {list(blocks.shape)}")
    scales = check_mxfp4(blocks, scales, out_dtype)
    experts, rows, groups, _ = blocks.shape
    out = out_tensor(out, (experts, groups * 32, rows), out_dtype, blocks.device)
    if _want_backend(backend, blocks.device) == "torch" and blocks.device.type == "cpu":
        b, s = blocks.contiguous().numpy(), scales.contiguous().numpy()
        bits = int_view(out)
        for e in range(experts):
            if out[e].numel():
                _gpt_oss_expert(b[e], s[e], bits[e], out_dtype)
        return out
    for e in range(experts):  # one expert's [OUT, IN] at a time bounds the scratch memory
        out[e].copy_(mxfp4_dequant(blocks[e], scales[e], backend=backend, out_dtype=out_dtype).T)
    return out


# ---------------------------------------------------------------- NVFP4

def check_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, convention: str,
                columns: int | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Shape/dtype checks; returns (scale as uint8 e4m3 codes, column count C)."""
    _check_out(out_dtype)
    if convention not in CONVENTIONS:
        raise ValueError(f"NVFP4 convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"NVFP4 packed weight must be uint8 [R, ceil(C/2)], got {packed.dtype} {list(packed.shape)}")
    rows, width = packed.shape
    cols = 2 * width if columns is None else int(columns)
    if cols < 0 or -(-cols // 2) != width:
        raise ValueError(f"NVFP4 packed width {width} does not hold {cols} columns (needs ceil(C/2) = "
                         f"{-(-cols // 2)})")
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    if scale.dtype != torch.uint8:
        raise ValueError(f"NVFP4 weight_scale must be float8_e4m3fn (F8_E4M3), got {scale.dtype}")
    want = (rows, -(-cols // 16))
    if tuple(scale.shape) != want:
        raise ValueError(f"NVFP4 weight_scale shape {list(scale.shape)} does not match weight [{rows}, {cols}] "
                         f"with 16-element groups (expected {list(want)})")
    if not isinstance(global_scale, torch.Tensor) or global_scale.numel() != 1 or global_scale.dim() > 1 \
            or global_scale.dtype != torch.float32:
        raise ValueError("NVFP4 global scale must be one float32 value (shape [] or [1]), got "
                         f"{getattr(global_scale, 'dtype', type(global_scale).__name__)} "
                         f"{list(getattr(global_scale, 'shape', []))}")
    if packed.device != scale.device:
        raise ValueError(f"NVFP4 weight and scale are on different devices ({packed.device}, {scale.device})")
    return scale, cols


def nvfp4_values(global_scale: torch.Tensor, convention: str, out_dtype: torch.dtype) -> torch.Tensor:
    """[256 scale codes, 16 nibbles] results with the convention's own op sequence."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1)
    gs = global_scale.detach().cpu()
    if convention == "compressed-tensors":
        eff = codes.to(torch.bfloat16) / gs  # float32 for a [1] global scale, as in their _dequantize
        x = torch.tensor(E2M1_SIGNED, dtype=torch.bfloat16).reshape(1, 16)
        return (x.to(eff.dtype) * eff).to(torch.bfloat16).to(out_dtype)
    eff = codes.to(torch.float32) * gs
    x = torch.tensor(E2M1_MODELOPT, dtype=torch.float32).reshape(1, 16)
    return (x * eff).to(out_dtype)


def torch_nvfp4_dequant(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, convention: str,
                        columns: int | None = None, out_dtype: torch.dtype = torch.bfloat16,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    scale, cols = check_nvfp4(packed, scale, global_scale, convention, columns, out_dtype)
    rows, width = packed.shape
    odd = cols != 2 * width  # the last byte's high nibble is padding: gather into scratch, cut
    res = _on_cpu(None if odd else out, (rows, 2 * width), out_dtype, packed.device)
    if res.numel():
        table = pair_table(canonical_nan(nvfp4_values(global_scale, convention, out_dtype)))
        gather_scaled_pairs(packed.detach().cpu().contiguous().numpy(), scale.detach().cpu().contiguous().numpy(),
                            8, table, res.view(_PAIR_INT[res.element_size()]).numpy())
    if odd:
        res = res[:, :cols].contiguous() if out is None or packed.device.type != "cpu" else out.copy_(res[:, :cols])
    return _finish(res, out, packed.device)


def nvfp4_dequant(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, convention: str, *,
                  columns: int | None = None, backend: str = "auto", out_dtype: torch.dtype = torch.bfloat16,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 `packed` uint8 [R, ceil(C/2)] (low nibble first), FP8 e4m3 `scale` [R, ceil(C/16)],
    float32 `global_scale` ([] or [1]) → out_dtype [R, C].

    convention "compressed-tensors": `weight_global_scale`, divides; "modelopt": `weight_scale_2`,
    multiplies (see the module docstring for the exact op order each uses). `columns` gives C
    when it is odd (the packed width cannot tell). Any row range works with its scale rows.
    `out`: a contiguous tensor to write into. Raises ValueError on a shape or dtype mismatch.
    """
    scale, cols = check_nvfp4(packed, scale, global_scale, convention, columns, out_dtype)
    if out is not None:
        out_tensor(out, (packed.shape[0], cols), out_dtype, packed.device)
    if _want_backend(backend, packed.device) == "triton":
        from ckptflow.tasks.kernels.fp4_triton import triton_nvfp4_dequant

        return triton_nvfp4_dequant(packed, scale, global_scale.to(packed.device), convention, cols,
                                    out_dtype=out_dtype, out=out)
    return torch_nvfp4_dequant(packed, scale, global_scale, convention, cols, out_dtype, out)

"""The quantize kernels the write pass calls, behind one seam.

The kernels proper (bit-exact with compressed-tensors, both roundings) belong to
`ckptflow.tasks.kernels.quant_fp8` / `quant_fp4` / `quant_common` (branch quant-kernels).
Until those modules are importable the
functions below are plain-torch versions of the same formulas (compressed-tensors 0.19
`quantize`/`calculate_qparams`, FP32 division), so the stage runs and its tests check layout,
grouping and streaming; the bit-exact comparison with llm-compressor needs the real kernels.
"""
from __future__ import annotations

import torch

try:  # the real kernels, once merged
    from ckptflow.tasks.kernels.quant_common import tensor_amax  # noqa: F401
    from ckptflow.tasks.kernels.quant_fp4 import mxfp4_quantize, nvfp4_global_scale, nvfp4_quantize  # noqa: F401
    from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize, fp8_channel_quantize  # noqa: F401
    REAL_KERNELS = True
except ImportError:  # pragma: no cover - depends on the merge state
    REAL_KERNELS = False

    E4M3_MAX, E2M1_MAX = 448.0, 6.0
    _E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

    def tensor_amax(w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax().float() if w.numel() else torch.zeros((), dtype=torch.float32)

    def _scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # compressed-tensors: amax / 448 in the weight's dtype; a zero scale becomes eps
        s = (amax.to(dtype) / E4M3_MAX).to(dtype)
        return torch.where(s == 0, torch.finfo(dtype).eps, s)

    def _to_fp8(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def fp8_block_quantize(w: torch.Tensor, rounding: str = "fp32", block: int = 128):
        rows, cols = w.shape
        rb, cb = -(-rows // block), -(-cols // block)
        pad = torch.zeros(rb * block, cb * block, dtype=w.dtype)
        pad[:rows, :cols] = w
        amax = pad.abs().reshape(rb, block, cb, block).amax(dim=(1, 3))
        scale = _scale_of(amax, w.dtype)
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        return _to_fp8(w.float() / full.float()), scale

    def fp8_channel_quantize(w: torch.Tensor, rounding: str = "fp32"):
        scale = _scale_of(w.abs().amax(dim=1, keepdim=True), w.dtype)
        return _to_fp8(w.float() / scale.float()), scale

    def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
        # 448·6 / amax as torch evaluates it on BF16: reciprocal in BF16, times 2688, then F32
        a = amax.to(torch.bfloat16)
        return ((E4M3_MAX * E2M1_MAX) * torch.reciprocal(a)).to(torch.bfloat16).float()

    def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
        mag = x.abs().clamp(max=E2M1_MAX)
        # nearest grid point, ties to the even code (its index is even)
        d = (mag.unsqueeze(-1) - _E2M1).abs()
        best = d.min(dim=-1, keepdim=True).values
        ties = (d == best)
        idx = torch.where(ties[..., ::2].any(-1), (ties[..., ::2].float().argmax(-1) * 2),
                          ties.float().argmax(-1)).to(torch.uint8)
        return idx | ((x < 0).to(torch.uint8) << 3)

    def _pack(codes: torch.Tensor) -> torch.Tensor:
        return codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first

    def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor, rounding: str = "fp32"):
        rows, cols = w.shape
        g = w.float().reshape(rows, cols // 16, 16)
        scale = (global_scale * (g.abs().amax(-1) / E2M1_MAX)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        s = scale.float() / global_scale
        s = torch.where(s == 0, torch.ones_like(s), s)
        return _pack(_e2m1_codes(g / s.unsqueeze(-1)).reshape(rows, cols)), scale

    def mxfp4_quantize(w: torch.Tensor, rounding: str = "fp32"):
        rows, cols = w.shape
        g = w.float().reshape(rows, cols // 32, 32)
        amax = g.abs().amax(-1)
        exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
        exp = exp.clamp(-127, 127)
        codes = _e2m1_codes(g / torch.exp2(exp).unsqueeze(-1))
        return _pack(codes.reshape(rows, cols)), (exp + 127).to(torch.uint8)

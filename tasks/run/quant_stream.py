"""Streaming per-tensor/channel FP8, NVFP4 and MXFP4 (gpt-oss, compressed-tensors) dequant for
`execute.write_shard`.

Each function is the `stream` of one entry of `tasks.plan.transforms.REGISTRY`, which the
executor imports through the registry: this module imports the executor, never the other way.

The kernels (`tasks/kernels/dispatch.py`) work on whole arrays; here the source is cut into
pieces of about `execute.CHUNK_BYTES` output so a shard task's memory stays a few chunks.
Both formats are element-wise, so a piece dequantized alone has exactly the bits of the whole.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from ckptflow.tasks.kernels.finite import BF16_MAX, F16_MAX, max_abs, may_overflow
from ckptflow.tasks.plan.model import OutputTensor
from ckptflow.tasks.run import execute
from ckptflow.tasks.run.execute import FP8_MAX, ExecContext, Piece, done, read_ahead, read_small
from ckptflow.tasks.run.finite_guard import check_scales, record

E2M1_MAX = 6.0


def _bf16_bytes(x: torch.Tensor) -> memoryview:
    import torch

    return memoryview(x.contiguous().cpu().view(torch.int16).numpy()).cast("B")


def _output(ctx: ExecContext, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """On the CPU the kernels write straight into a pooled buffer the writer hands back when it
    has written it (no allocation per chunk); on a device they allocate there."""
    import torch

    if ctx.device != "cpu":
        return None, None
    n = 1
    for d in shape:
        n *= d
    buf = ctx.buffers.take(2 * n)
    return torch.from_numpy(buf).view(torch.bfloat16).reshape(shape), buf


def _host(got: torch.Tensor, buf: np.ndarray | None) -> np.ndarray:
    """The chunk's BF16 bits on the host (the pooled buffer on the CPU), for counting inf/NaN."""
    return buf if buf is not None else np.frombuffer(_bf16_bytes(got), dtype=np.uint8)


def _piece(ctx: ExecContext, got: torch.Tensor, buf: np.ndarray | None) -> Piece:
    return (memoryview(buf), ctx.releaser(buf)) if buf is not None else (_bf16_bytes(got), None)


def fp8_scaled_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """compressed-tensors / ModelOpt FP8 with a per-tensor or per-channel scale, in row chunks;
    the multiply happens in the scale's dtype, as compressed-tensors does (kernels/fp8_scaled.py)."""
    import torch

    from ckptflow.tasks.kernels.dispatch import fp8_scaled_dequant
    from ckptflow.tasks.kernels.dtype_map import ST_TO_TORCH

    weight, scale = t.sources
    rows, cols = weight.shape
    sdt = ST_TO_TORCH[scale.dtype]
    per_channel = scale.shape not in ((), (1,))
    whole = None
    if not per_channel:
        raw_whole = read_small(ctx, scale)
        check_scales(t, scale, raw_whole)
        whole = torch.frombuffer(raw_whole, dtype=sdt).reshape(scale.shape)
    # the product is taken in the scale's dtype: float16 scales overflow at 65504, not at BF16's max
    limit = F16_MAX if scale.dtype == "F16" else BF16_MAX
    scan_whole = whole is not None and may_overflow(max_abs(scale.dtype, raw_whole) * FP8_MAX[weight.dtype], limit)
    step = max(1, execute.CHUNK_BYTES // max(2 * cols, 1))
    spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    ranges = [(weight.start + r0 * cols, weight.start + r1 * cols) for r0, r1 in spans]
    for (r0, r1), (raw, release) in zip(spans, read_ahead(ctx, weight.file, ranges)):
        w = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, cols).copy())
        done(release)
        scan = scan_whole
        if whole is not None:
            s = whole
        else:
            raw_s = read_small(ctx, scale, r0 * sdt.itemsize, r1 * sdt.itemsize)
            check_scales(t, scale, raw_s)
            scan = may_overflow(max_abs(scale.dtype, raw_s) * FP8_MAX[weight.dtype], limit)
            s = torch.frombuffer(raw_s, dtype=sdt).reshape(r1 - r0, 1)
        out, buf = _output(ctx, (r1 - r0, cols))
        got = fp8_scaled_dequant(w.view(torch.float8_e4m3fn).to(ctx.device), s.to(ctx.device),
                                 backend=ctx.backend, out_dtype=torch.bfloat16, out=out)
        if scan:
            record(ctx, t, _host(got, buf), w.numpy())
        yield _piece(ctx, got, buf)


def nvfp4_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """NVFP4 rows in chunks: packed [rows, cols/2] E2M1 pairs, FP8 scale per group, one global scale."""
    import torch

    from ckptflow.tasks.kernels.dispatch import nvfp4_dequant

    packed, scale, global_scale = t.sources
    rows, half = packed.shape
    groups = scale.shape[1]
    raw_g = read_small(ctx, global_scale)
    check_scales(t, global_scale, raw_g)
    g = torch.frombuffer(raw_g, dtype=torch.float32).reshape(global_scale.shape)
    # compressed-tensors divides by its global scale, ModelOpt multiplies by weight_scale_2
    g_abs = max_abs(global_scale.dtype, raw_g)
    factor = g_abs if t.param("convention") == "modelopt" else (1 / g_abs if g_abs else float("inf"))
    step = max(1, execute.CHUNK_BYTES // max(4 * half, 1))  # output rows of 2·cols bf16 bytes each
    spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    ranges = [(packed.start + r0 * half, packed.start + r1 * half) for r0, r1 in spans]
    for (r0, r1), (raw, release) in zip(spans, read_ahead(ctx, packed.file, ranges)):
        codes = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, half).copy())
        done(release)
        raw_s = read_small(ctx, scale, r0 * groups, r1 * groups)
        check_scales(t, scale, raw_s)
        s = torch.frombuffer(raw_s, dtype=torch.float8_e4m3fn).reshape(r1 - r0, groups)
        out, buf = _output(ctx, (r1 - r0, 2 * half))
        got = nvfp4_dequant(codes.to(ctx.device), s.to(ctx.device), g.to(ctx.device),
                            convention=t.param("convention"), backend=ctx.backend, out_dtype=torch.bfloat16, out=out)
        if may_overflow(E2M1_MAX * max_abs(scale.dtype, raw_s) * factor):
            record(ctx, t, _host(got, buf))  # E2M1 codes are all finite
        yield _piece(ctx, got, buf)


def ct_mxfp4_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """compressed-tensors MXFP4 rows in chunks: packed [rows, cols/2] E2M1 pairs, a uint8 E8M0
    scale per 32 columns [rows, cols/32], no global scale. A row's bytes are its groups' blocks."""
    import torch

    from ckptflow.tasks.kernels.dispatch import mxfp4_dequant

    packed, scale = t.sources
    rows, half = packed.shape
    groups = scale.shape[1]
    step = max(1, execute.CHUNK_BYTES // max(4 * half, 1))  # output rows of 2·cols bf16 bytes each
    spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    ranges = [(packed.start + r0 * half, packed.start + r1 * half) for r0, r1 in spans]
    for (r0, r1), (raw, release) in zip(spans, read_ahead(ctx, packed.file, ranges)):
        codes = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, groups, 16).copy())
        done(release)
        raw_s = read_small(ctx, scale, r0 * groups, r1 * groups)
        check_scales(t, scale, raw_s)  # E8M0 255 is NaN: refused unless non-finite output is allowed
        s = torch.frombuffer(raw_s, dtype=torch.uint8).reshape(r1 - r0, groups)
        out, buf = _output(ctx, (r1 - r0, 2 * half))
        got = mxfp4_dequant(codes.to(ctx.device), s.to(ctx.device), backend=ctx.backend, out=out,
                            convention="compressed-tensors")
        if may_overflow(E2M1_MAX * max_abs(scale.dtype, raw_s)):
            record(ctx, t, _host(got, buf))  # E2M1 codes are all finite
        yield _piece(ctx, got, buf)


def mxfp4_gpt_oss_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """gpt-oss experts: blocks [E, OUT, G, 16] + E8M0 scales [E, OUT, G] → [E, G·32, OUT] BF16.

    The output is transposed, so one expert's packed bytes are read at a time (OUT·G·16 bytes,
    8 MB for gpt-oss-120b) and written out as runs of whole 32-row groups of about execute.CHUNK_BYTES.
    """
    import torch

    from ckptflow.tasks.kernels.dispatch import mxfp4_gpt_oss

    blocks, scales = t.sources
    experts, out, groups, width = blocks.shape
    per_expert = out * groups * width
    step = max(1, execute.CHUNK_BYTES // max(out * 32 * 2, 1))  # groups per output chunk
    ranges = [(blocks.start + e * per_expert, blocks.start + (e + 1) * per_expert) for e in range(experts)]
    for e, (raw, release) in zip(range(experts), read_ahead(ctx, blocks.file, ranges)):
        b = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(1, out, groups, width).copy())
        done(release)
        raw_s = read_small(ctx, scales, e * out * groups, (e + 1) * out * groups)
        check_scales(t, scales, raw_s)
        scan = may_overflow(E2M1_MAX * max_abs(scales.dtype, raw_s))
        s = torch.frombuffer(raw_s, dtype=torch.uint8).reshape(1, out, groups)
        for g0 in range(0, groups, step):
            g1 = min(g0 + step, groups)
            out_t, buf = _output(ctx, (1, (g1 - g0) * 32, out))
            got = mxfp4_gpt_oss(b[:, :, g0:g1].contiguous().to(ctx.device),
                                s[:, :, g0:g1].contiguous().to(ctx.device), backend=ctx.backend, out=out_t)
            if scan:
                record(ctx, t, _host(got, buf))  # E2M1 codes are all finite
            yield _piece(ctx, got, buf)


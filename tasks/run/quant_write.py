"""Streaming `--quantize` for `execute.write_shard`: the stream functions of the `quant_*` transforms.

A quantized weight's values come from its `inner` tensor (a plain copy of the source, or an
upstream transform such as `dequant_fp8`), streamed row-major in pieces and regrouped here into
row chunks of whole 128-row blocks (about `execute.CHUNK_BYTES` of input each; an expert of a
stacked 3-D weight never shares a chunk with the next), so a shard task holds a chunk, never a
tensor. Codes go out at once; the scales of each chunk wait in `ctx.stash` for the scale tensor,
which the planner puts right after its weight in the same shard (scales are 1/16 of the codes or
less). The global scale of NVFP4 was computed by the planner from the amax pass (`quant_amax`).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ckptflow.tasks.plan.model import OutputTensor
from ckptflow.tasks.plan.transforms import COPY, stream_of
from ckptflow.tasks.run import execute
from ckptflow.tasks.run.execute import ExecContext, Piece, done, read_ahead

if TYPE_CHECKING:
    import torch

BLOCK = 128  # FP8-block rows; every chunk but an expert's last is a multiple of it


def _inner(t: OutputTensor) -> OutputTensor:
    transform, dtype, shape, params = t.param("inner")
    return OutputTensor(t.param("weight"), dtype, tuple(shape), transform, t.sources,
                        tuple(tuple(p) for p in params))


def _row_chunks(inner: OutputTensor, row_bytes: int) -> list[int]:
    """Rows per chunk, in order: whole 128-row blocks of about CHUNK_BYTES, restarting at each
    expert of a stacked 3-D weight."""
    *lead, rows, _ = inner.shape
    mats = int(np.prod(lead)) if lead else 1
    step = max(BLOCK, execute.CHUNK_BYTES // max(row_bytes, 1) // BLOCK * BLOCK)
    return [(min(r0 + step, rows) - r0) for _ in range(mats) for r0 in range(0, rows, step)]


def _chunks(t: OutputTensor, ctx: ExecContext) -> Iterator[torch.Tensor]:
    """The inner tensor's values as 2-D row chunks, in order. Each chunk is valid until the next
    is asked for (its buffer goes back to the pool then)."""
    import torch

    from ckptflow.tasks.kernels.dtype_map import ST_TO_TORCH

    inner = _inner(t)
    dtype = ST_TO_TORCH[inner.dtype]
    cols = inner.shape[-1]
    row_bytes = cols * dtype.itemsize
    sizes = _row_chunks(inner, row_bytes)
    if inner.transform == COPY.name and inner.param("cut") is None:
        # a plain copy (the common case): read each chunk's own byte range straight into a pooled
        # buffer and wrap it; no reassembly, no copy (a kernel copy's FileRange has no values to see)
        (src,) = inner.sources
        ranges, a = [], src.start
        for n in sizes:
            ranges.append((a, a + n * row_bytes))
            a += n * row_bytes
        for n, (raw, release) in zip(sizes, read_ahead(ctx, src.file, ranges)):
            if not isinstance(raw, memoryview) or raw.readonly:
                raw = bytearray(raw)  # torch wraps only writable buffers without a warning
            yield torch.frombuffer(raw, dtype=dtype).reshape(n, cols) if n * cols else torch.empty(0, cols, dtype=dtype)
            done(release)
        return
    yield from _regrouped(stream_of(inner.transform)(inner, ctx), sizes, cols, dtype, ctx)


def _regrouped(pieces: Iterator[Piece], sizes: list[int], cols: int, dtype: torch.dtype,
               ctx: ExecContext) -> Iterator[torch.Tensor]:
    """An upstream transform's pieces (any sizes) copied once into pooled row-chunk buffers."""
    import torch

    row_bytes = cols * dtype.itemsize
    data: memoryview | None = None
    release = None
    used = 0
    for n in sizes:
        need = n * row_bytes
        buf = ctx.buffers.take(need)
        have = 0
        while have < need:
            if data is None or used == len(data):
                done(release)
                raw, release = next(pieces)
                data, used = memoryview(raw).cast("B"), 0
            k = min(need - have, len(data) - used)
            buf[have:have + k] = data[used:used + k]
            have += k
            used += k
        yield torch.from_numpy(buf).view(dtype).reshape(n, cols) if need else torch.empty(0, cols, dtype=dtype)
        ctx.buffers.give(buf)
    done(release)


def _bytes(x: torch.Tensor) -> memoryview:
    """x's bytes without a copy (the memoryview keeps x alive until the writer has written it)."""
    import torch

    return memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")


def quant_weight_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """Codes of each row chunk; its scales go to `ctx.stash` for the scale tensor that follows."""
    import torch

    from ckptflow.tasks.kernels.quant_fp4 import mxfp4_quantize, nvfp4_quantize
    from ckptflow.tasks.kernels.quant_fp8 import fp8_block_quantize, fp8_channel_quantize

    kernel, rounding = t.param("kernel"), t.param("rounding")
    scales = ctx.stash.setdefault(t.param("scale_name"), [])
    g = torch.tensor([t.param("global_scale") or 0.0], dtype=torch.float32)
    fp4 = kernel in ("nvfp4", "mxfp4")
    for w in _chunks(t, ctx):
        # codes go straight into a pooled buffer the writer gives back: no fresh allocation per chunk
        # (page faults, and glibc heaps that grow on buffers freed by the writer thread)
        rows, cols = w.shape
        buf = ctx.buffers.take(rows * (cols // 2 if fp4 else cols))
        out = torch.from_numpy(buf).reshape(rows, -1) if rows * cols else None
        if out is not None and not fp4:
            out = out.view(torch.float8_e4m3fn)
        if kernel == "fp8_block":
            q, s = fp8_block_quantize(w, rounding, out=out)
        elif kernel == "fp8_channel":
            q, s = fp8_channel_quantize(w, rounding, out=out)
        elif kernel == "nvfp4":
            q, s = nvfp4_quantize(w, g, rounding, out=out)
        elif kernel == "mxfp4":
            q, s = mxfp4_quantize(w, rounding, out=out)
        else:
            raise ValueError(f"tensor {t.name!r}: unknown quantize kernel {kernel!r}")
        scales.append(_bytes(s))
        yield (memoryview(buf), ctx.releaser(buf)) if out is not None else (_bytes(q), None)


def quant_scale_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    parts = ctx.stash.pop(t.name, None)
    if parts is None:  # the planner puts every scale after its weight in the same shard
        raise RuntimeError(f"tensor {t.name!r}: its weight {t.param('of')!r} was not written before it")
    for p in parts:
        yield p, None


def quant_const_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    value = t.param("global_scale")
    if value is None:
        raise RuntimeError(f"tensor {t.name!r}: no global scale planned (the amax pass did not run)")
    yield struct.pack("<f", value), None


def quant_amax_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """max |w| of the weight, read once through its inner transform, as one F32."""
    import torch

    from ckptflow.tasks.kernels.quant_common import tensor_amax

    amax = torch.zeros((), dtype=torch.float32)
    for w in _chunks(t, ctx):
        if w.numel():
            amax = torch.maximum(amax, tensor_amax(w).float())
    yield struct.pack("<f", float(amax)), None

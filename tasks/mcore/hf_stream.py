"""The executor's stream for `mcore_region`: an HF tensor assembled from chunk byte ranges.

Output rows go out in pieces of at most `CHUNK_BYTES`: each piece's buffer is filled from the
one byte run per chunk it touches (`regions.reads`), placed at the chunk's trailing offsets
(TP ranks split a row-parallel weight's columns), and handed to the writer. Bytes are copied,
never decoded: bf16 stays bf16 bit for bit. Peak memory: a few pieces, whatever the model.
"""
from __future__ import annotations

from collections.abc import Iterator
import numpy as np

from ckptflow.storage.safetensors_format import DTYPE_SIZES
from ckptflow.tasks.mcore.hf_regions import pieces, reads
from ckptflow.tasks.plan.model import OutputTensor
from ckptflow.tasks.run.execute import CHUNK_BYTES, ExecContext, Piece


def region_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    item = DTYPE_SIZES[t.dtype]
    trailing = tuple(t.shape[1:])
    n = len(t.param("lead"))
    for g0, g1 in pieces(t, CHUNK_BYTES):
        todo = reads(t, g0, g1)
        nbytes = (g1 - g0) * int(np.prod(trailing, dtype=np.int64)) * item
        buf = ctx.buffers.take(nbytes)
        out = buf.view(np.uint8).reshape(g1 - g0, *trailing, item) if nbytes else buf
        got = 0
        futures = [ctx.pool.submit(ctx.reader.read, t.sources[r.source].file, r.start, r.end) for r in todo]
        for r, fut in zip(todo, futures):
            data = np.frombuffer(fut.result(), dtype=np.uint8)
            src, offsets = t.sources[r.source], t.param("offsets")[r.source]
            box = tuple(slice(o, o + s) for o, s in zip(offsets[n + 1:], src.shape[n + 1:]))
            out[(slice(r.r0 - g0, r.r1 - g0), *box)] = data.reshape(r.r1 - r.r0, *src.shape[n + 1:], item)
            got += (r.r1 - r.r0) * int(np.prod(src.shape[n + 1:], dtype=np.int64)) * item
        if got != nbytes:  # the readers check the tiling; this is the last line of defence
            ctx.buffers.give(buf)
            raise ValueError(f"{t.name}: its chunks of {t.sources[0].name.split('@')[0]} cover {got} of the "
                             f"{nbytes} bytes of rows [{g0}, {g1}); the checkpoint's chunks leave a gap")
        yield memoryview(buf), ctx.releaser(buf)


"""Write one output shard from its plan: read source ranges, transform, stream, commit.

Peak memory is a few chunks (≈ `CHUNK_BYTES` each), never a tensor's float32 copy, never a
shard. Reads run ahead on a small thread pool (ranged GETs on object stores), compute runs on
the caller's thread (itself multi-threaded), writes drain on a writer thread, so the three overlap.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from storage.reader import RangeReader
from storage.urls import Location
from storage.writer import SafetensorsWriter, WrittenFile

from .plan import OutputTensor, ShardPlan

CHUNK_BYTES = 16 << 20
READ_AHEAD = 2
Progress = Callable[[int], None]


class _BackgroundWriter:
    """Runs `SafetensorsWriter.write` on its own thread behind a bounded queue."""

    def __init__(self, writer: SafetensorsWriter, depth: int = 2):
        self.writer = writer
        self._q: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckptflow-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # re-raised on the caller's thread
                    self._error = exc

    def put(self, name: str, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, data))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _read_ahead(reader: RangeReader, file: str, ranges: list[tuple[int, int]],
                pool: ThreadPoolExecutor) -> Iterator[memoryview | bytes]:
    if reader.loc.is_local:  # mmap: the "read" is a page fault during compute
        for a, b in ranges:
            yield reader.read(file, a, b)
        return
    pending = [pool.submit(reader.read, file, a, b) for a, b in ranges[:READ_AHEAD]]
    for i in range(len(ranges)):
        data = pending.pop(0).result()
        if i + READ_AHEAD < len(ranges):
            a, b = ranges[i + READ_AHEAD]
            pending.append(pool.submit(reader.read, file, a, b))
        yield data


def _copy(t: OutputTensor, reader: RangeReader, pool: ThreadPoolExecutor) -> Iterator[bytes | memoryview]:
    (src,) = t.sources
    ranges = [(a, min(a + CHUNK_BYTES, src.end)) for a in range(src.start, src.end, CHUNK_BYTES)]
    yield from _read_ahead(reader, src.file, ranges, pool)


def _dequant(t: OutputTensor, reader: RangeReader, pool: ThreadPoolExecutor) -> Iterator[bytes | memoryview]:
    import torch

    from .fp8 import FP8_DTYPES, dequant_rows
    from .fp8_layout import normalise_scale

    weight, scale = t.sources
    fp8 = FP8_DTYPES[weight.dtype]
    scale_t = torch.frombuffer(bytearray(reader.read(scale.file, scale.start, scale.end)),
                               dtype=torch.float32).reshape(scale.shape)
    bm, bn = normalise_scale(weight.shape, scale.shape, tuple(t.param("block")), t.name)
    rows, cols = weight.shape[-2:]
    mats = int(np.prod(weight.shape[:-2])) if len(weight.shape) > 2 else 1
    scales = scale_t.reshape(-1, 1, 1).expand(mats, 1, 1) if scale_t.numel() == 1 \
        else scale_t.reshape(mats, -(-rows // bm), -(-cols // bn))
    step = max(bm, (CHUNK_BYTES // max(cols, 1)) // bm * bm)  # whole block rows per chunk
    pieces = [(e, r, min(r + step, rows)) for e in range(mats) for r in range(0, rows, step)]
    ranges = [(weight.start + (e * rows + r0) * cols, weight.start + (e * rows + r1) * cols)
              for e, r0, r1 in pieces]
    out_dtype = torch.bfloat16
    for (e, r0, r1), raw in zip(pieces, _read_ahead(reader, weight.file, ranges, pool)):
        codes = np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, cols)
        out = np.empty((r1 - r0, cols), dtype=np.int16)
        dequant_rows(codes, scales[e, r0 // bm: -(-r1 // bm)], (bm, bn), fp8, out, out_dtype)
        yield memoryview(out).cast("B")


TRANSFORMS = {"copy": _copy, "dequant_fp8": _dequant}


def write_shard(shard: ShardPlan, src: Location, dst: Location,
                progress: Progress | None = None, digest: bool = False) -> WrittenFile:
    """Write `shard.file` under `dst` from sources under `src`; atomic; returns its record."""
    with RangeReader(src) as reader, ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="ckptflow-read") as pool:
        writer = SafetensorsWriter(dst, shard.file, shard.specs, digest=digest)
        bg = _BackgroundWriter(writer)
        try:
            for t in shard.tensors:
                transform = TRANSFORMS.get(t.transform)
                if transform is None:
                    raise ValueError(f"{shard.file}: tensor {t.name!r} has unknown transform {t.transform!r}")
                for piece in transform(t, reader, pool):
                    bg.put(t.name, piece)
                    if progress:
                        progress(len(piece))
            bg.close()
        except BaseException:
            try:
                bg.close()
            except BaseException:
                pass
            writer.abort()
            raise
        return writer.commit()

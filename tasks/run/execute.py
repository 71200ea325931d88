"""Write one output shard from its plan: read source ranges, transform, stream, commit.

Peak memory is a few chunks (≈ `CHUNK_BYTES` each), never a tensor's float32 copy, never a
shard. Reads run ahead on a small thread pool (ranged GETs on object stores), compute runs on
the caller's thread (itself multi-threaded), writes drain on a writer thread, so the three overlap.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ckptflow.storage.reader import RangeReader
from ckptflow.storage.safetensors_format import DTYPE_SIZES
from ckptflow.storage.urls import Location
from ckptflow.storage.writer import SafetensorsWriter, WrittenFile

from ckptflow.tasks.kernels.finite import max_abs, may_overflow
from ckptflow.tasks.run.buffers import BufferPool
from ckptflow.tasks.run.finite_guard import check_scales, record
from ckptflow.tasks.run.cuts import cut_stream, source_cut
from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
from ckptflow.tasks.plan.regions import BlockRegion, Cut, cut_of, uncut
from ckptflow.tasks.plan.transforms import COPY, stream_of, transform_of

CHUNK_BYTES = 8 << 20
READ_AHEAD = 2
Progress = Callable[[int], None]


Release = Callable[[], None]


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy file-to-file in the kernel instead of through a buffer."""

    fd: int
    offset: int
    length: int
    drop_source: bool = False  # drop the copied source bytes from the page cache (RangeReader.drop_behind)

    def __len__(self) -> int:
        return self.length


class _BackgroundWriter:
    """Runs `SafetensorsWriter.write` on its own thread behind a bounded queue.

    Each piece comes with a `release` callback, called once its bytes are written, so the
    buffer goes back to the pool.
    """

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
            name, data, release = item
            if self._error is None:
                try:
                    if isinstance(data, FileRange):
                        self.writer.copy_range(name, data.fd, data.offset, data.length, data.drop_source)
                    else:
                        self.writer.write(name, data)
                except BaseException as exc:  # re-raised on the caller's thread
                    self._error = exc
            if release is not None:
                release()

    def put(self, name: str, data: bytes | memoryview, release: Release | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, data, release))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass
class ExecContext:
    reader: RangeReader
    pool: ThreadPoolExecutor
    buffers: BufferPool = field(default_factory=BufferPool)
    device: str = "cpu"        # where dequant runs: "cpu" or "cuda[:n]"
    backend: str = "auto"      # weight_dequant backend: "auto" | "torch" | "triton"
    kernel_copy: bool = False  # local → local and no hashing: copies go through copy_file_range
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor → inf/NaN from finite codes (finite_guard)
    # --quantize: a weight's stream leaves its scale bytes here for the scale tensor after it (quant_write)
    stash: dict[str, list[bytes]] = field(default_factory=dict)

    def releaser(self, buf: np.ndarray) -> Release:
        return lambda: self.buffers.give(buf)


Piece = tuple[memoryview | bytes | FileRange, Release | None]


def read_ahead(ctx: ExecContext, file: str, ranges: list[tuple[int, int]],
               columns: tuple[int, int, int] | None = None) -> Iterator[Piece]:
    """Yield (bytes, release) for each range, READ_AHEAD reads in flight; release when done.

    `columns` = (row, lo, hi): each range is whole `row`-byte rows, of which only bytes [lo, hi)
    are wanted; each piece then holds those, row after row (`RangeReader.read_columns`)."""

    def read(a: int, b: int) -> Piece:
        size = b - a if columns is None else (b - a) // columns[0] * (columns[2] - columns[1])
        # whole ranges get room for an O_DIRECT read's partial pages (RangeReader.SLACK)
        slack = ctx.reader.SLACK if columns is None and ctx.reader.drop_behind else 0
        buf = ctx.buffers.take(size + slack) if ctx.reader.loc.is_local else None
        got = ctx.reader.read(file, a, b, out=buf) if columns is None \
            else ctx.reader.read_columns(file, a, b, *columns, out=buf)
        return got, (ctx.releaser(buf) if buf is not None else None)

    pending = [ctx.pool.submit(read, a, b) for a, b in ranges[:READ_AHEAD]]
    for i in range(len(ranges)):
        piece = pending.pop(0).result()
        if i + READ_AHEAD < len(ranges):
            pending.append(ctx.pool.submit(read, *ranges[i + READ_AHEAD]))
        yield piece


def done(release: Release | None) -> None:
    if release is not None:
        release()


def _reader(ctx: ExecContext) -> Callable[..., Iterator[Piece]]:
    return lambda file, ranges, columns=None: read_ahead(ctx, file, ranges, columns)


def _source_cut(t: OutputTensor, ctx: ExecContext, cut: Cut) -> Iterator[Piece]:
    (src,) = t.sources
    return source_cut(_reader(ctx), src, cut, DTYPE_SIZES[src.dtype], CHUNK_BYTES)


def copy_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    (src,) = t.sources
    cut = cut_of(t)
    if cut is not None:  # a copy of a slice is the slice of the source
        yield from _source_cut(t, ctx, cut)
        return
    if ctx.kernel_copy:
        yield FileRange(ctx.reader.fd(src.file), src.start, src.end - src.start, ctx.reader.drop_behind), None
        return
    ranges = [(a, min(a + CHUNK_BYTES, src.end)) for a in range(src.start, src.end, CHUNK_BYTES)]
    yield from read_ahead(ctx, src.file, ranges)  # the writer releases each read buffer


def read_small(ctx: ExecContext, ref: SourceRef, a: int | None = None, b: int | None = None) -> bytearray:
    """Bytes [a, b) of `ref` (default: all of it) as a writable buffer torch can wrap."""
    start = ref.start if a is None else ref.start + a
    end = ref.end if b is None else ref.start + b
    return bytearray(ctx.reader.read(ref.file, start, end)) if end > start else bytearray()


def dequant_fp8_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """Whole block rows a chunk at a time; with a `cut`, only the blocks the slice touches are
    read and dequantized, and the slice is cut out of them (see `cuts.BlockRegion`)."""
    import torch

    from ckptflow.tasks.kernels.dispatch import block_scale_float32, weight_dequant
    from ckptflow.tasks.kernels.dtype_map import ST_TO_TORCH
    from ckptflow.tasks.kernels.fp8_cpu import FP8_TORCH_DTYPES, dequant_rows, matrix_scales

    weight, scale = t.sources
    fp8 = FP8_TORCH_DTYPES[weight.dtype]
    raw_dtype = torch.uint8 if scale.dtype == "F8_E8M0" else ST_TO_TORCH[scale.dtype]
    scale_bytes = read_small(ctx, scale)
    check_scales(t, scale, scale_bytes)  # every block's scale, before a byte of this tensor is written
    # only scales that could overflow BF16 make the output worth scanning for inf/NaN
    scan = may_overflow(max_abs(scale.dtype, scale_bytes) * FP8_MAX[weight.dtype])
    raw_scale = torch.frombuffer(scale_bytes, dtype=raw_dtype) if scale.end > scale.start \
        else torch.empty(0, dtype=raw_dtype)
    # F32, BF16 and E8M0 block scales all widen to float32 exactly (kernels/scales.py)
    scale_t = block_scale_float32(raw_scale.reshape(scale.shape),
                                  "F8_E8M0" if scale.dtype == "F8_E8M0" else None, scale.name)
    (bm, bn), scales = matrix_scales(weight.shape, scale_t, tuple(t.param("block")), t.name)
    rows, cols = weight.shape[-2:]
    region = BlockRegion.of(weight.shape, (bm, bn), cut_of(t))
    (c0, c1), out_cols = region.cols, region.cols[1] - region.cols[0]
    step = max(bm, (CHUNK_BYTES // max(cols, 1)) // bm * bm)  # whole block rows per chunk
    pieces = region.row_chunks(step)
    ranges = [(weight.start + (e * rows + r0) * cols, weight.start + (e * rows + r1) * cols)
              for e, r0, r1 in pieces]
    on_cpu_tables = ctx.device == "cpu" and ctx.backend in ("auto", "torch")
    narrow = (cols, c0, c1) if out_cols < cols else None  # a column cut: read only its bytes of each row
    for (e, r0, r1), (raw, release) in zip(pieces, read_ahead(ctx, weight.file, ranges, narrow)):
        codes = np.frombuffer(raw, dtype=np.uint8).reshape(r1 - r0, out_cols)
        block_scales = scales[e, r0 // bm: -(-r1 // bm), c0 // bn: -(-c1 // bn)]
        if on_cpu_tables:
            buf = ctx.buffers.take((r1 - r0) * out_cols * 2)
            dequant_rows(codes, block_scales, (bm, bn), fp8, buf.view(np.int16).reshape(r1 - r0, out_cols))
            if scan:
                _scan(ctx, t, region, r0, r1, buf, codes)
            done(release)
            yield from _trimmed(ctx, region, r0, r1, buf, 2)
            continue
        # Device path: this chunk to the device, dequant there, bf16 bytes back.
        # a copy: `codes` views the read buffer, which `done` hands back to the pool for the next read
        w = torch.from_numpy(codes.copy()).to(ctx.device, non_blocking=True).view(fp8)
        done(release)
        s = block_scales.contiguous().to(ctx.device) if scale_t.numel() > 1 else scale_t
        got = weight_dequant(w, s, (bm, bn), backend=ctx.backend)
        host = np.frombuffer(memoryview(got.cpu().view(torch.int16).numpy()).cast("B"), dtype=np.uint8)
        if scan:
            _scan(ctx, t, region, r0, r1, host, w.view(torch.uint8).cpu().numpy())
        yield from _trimmed(ctx, region, r0, r1, host, 2, pooled=False)


FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}  # largest finite code of each FP8 format


def _scan(ctx: ExecContext, t: OutputTensor, region: BlockRegion, r0: int, r1: int, buf: np.ndarray,
          codes: np.ndarray) -> None:
    """Count inf/NaN in the part of a computed chunk that is kept (a cut's slice), from finite codes."""
    out = buf[: codes.size * 2].view(np.int16).reshape(codes.shape)
    keep = region.trim(r0, r1)
    if keep is not None:
        out, codes = out[keep], codes[keep]
    record(ctx, t, out, codes)


def _trimmed(ctx: ExecContext, region: BlockRegion, r0: int, r1: int, buf: np.ndarray, item: int,
             pooled: bool = True) -> Iterator[Piece]:
    """A computed chunk (rows [r0, r1) × the region's whole-block columns), cut to the slice."""
    keep = region.trim(r0, r1)
    if keep is None:
        yield memoryview(buf), ctx.releaser(buf) if pooled else None
        return
    rows, cols = keep
    width = (region.cols[1] - region.cols[0]) * item
    part = buf.reshape(r1 - r0, width)[rows, cols.start * item: cols.stop * item]
    if part.size:
        out = ctx.buffers.take(part.size)
        out.reshape(part.shape)[:] = part
        yield memoryview(out), ctx.releaser(out)
    if pooled:
        ctx.buffers.give(buf)


def cast_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """Cast element-wise with torch's own `.to()` (round to nearest-even), chunk by chunk; with a
    `cut`, only the slice's bytes are read and cast (slicing commutes with an element-wise op)."""
    import torch

    from ckptflow.tasks.kernels.dtype_map import ST_TO_TORCH

    (src,) = t.sources
    src_dt, dst_dt = ST_TO_TORCH[src.dtype], ST_TO_TORCH[t.dtype]
    cut = cut_of(t)
    if cut is not None:
        raws = _source_cut(t, ctx, cut)
    else:
        step = max(1, CHUNK_BYTES // src_dt.itemsize) * src_dt.itemsize
        raws = read_ahead(ctx, src.file, [(a, min(a + step, src.end)) for a in range(src.start, src.end, step)])
    for raw, release in raws:
        if not isinstance(raw, memoryview) or raw.readonly:
            raw = bytearray(raw)  # torch wraps only writable buffers without a warning
        n = len(raw) // src_dt.itemsize
        buf = ctx.buffers.take(n * dst_dt.itemsize)
        # copy_ casts with the same kernels, and so the same rounding, as .to()
        torch.from_numpy(buf).view(dst_dt).copy_(torch.frombuffer(raw, dtype=src_dt))
        done(release)
        yield memoryview(buf), ctx.releaser(buf)


def slice_stream(t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """`source[..., start:stop, ...]` along `dim`, as raw bytes (any dtype, no decode)."""
    return _source_cut(t, ctx, (t.param("dim"), t.param("start"), t.param("stop")))


def _pieces(file: str, t: OutputTensor, ctx: ExecContext) -> Iterator[Piece]:
    """`t`'s bytes from its transform's stream function (`tasks.plan.transforms`): a `cut` is made
    by the transform itself where its entry says it can, else cut out of its whole output."""
    try:
        entry = transform_of(t)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
    stream = stream_of(entry.name)
    cut = cut_of(t)
    if cut is None or entry.cuts_itself:
        return stream(t, ctx)
    whole = uncut(t)
    item = DTYPE_SIZES[t.dtype]
    return cut_stream(stream(whole, ctx), whole.shape, item, cut, ctx.buffers.take, ctx.releaser)


def write_shard(shard: ShardPlan, src: Location, dst: Location, progress: Progress | None = None,
                digest: bool = False, device: str = "cpu", backend: str = "auto",
                before_publish: Callable[[WrittenFile, str | None], None] | None = None) -> WrittenFile:
    """Write `shard.file` under `dst` from sources under `src`; atomic; returns its record.
    `before_publish`: see `SafetensorsWriter.commit`."""
    # Source bytes leave the page cache once read (`RangeReader.drop_behind`): a conversion reads
    # each once, but for MP ranks' column slices (not dropped) and replicated tensors, which at
    # real sizes the cache could not keep from one rank's pass to the next anyway.
    with RangeReader(src, drop_behind=True) as reader, \
            ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="ckptflow-read") as pool:
        ctx = ExecContext(reader, pool, device=device, backend=backend,
                          kernel_copy=src.is_local and dst.is_local and not digest)
        reader.expect((ref.file, ref.start, ref.end) for t in shard.tensors for ref in t.sources)
        # Computed bytes go out with O_DIRECT; a shard of whole-tensor copies (reindex) stays with
        # copy_file_range: reflinks where the filesystem shares extents, a kernel copy elsewhere.
        only_copies = ctx.kernel_copy and all(t.transform == COPY.name and cut_of(t) is None for t in shard.tensors)
        writer = SafetensorsWriter(dst, shard.file, shard.specs, digest=digest, direct=not only_copies)
        bg = _BackgroundWriter(writer)
        try:
            for t in shard.tensors:
                for data, release in _pieces(shard.file, t, ctx):
                    bg.put(t.name, data, release)
                    if progress:
                        progress(len(data))
            bg.close()
        except BaseException:
            try:
                bg.close()
            except BaseException:
                pass
            writer.abort()
            raise
        counted = tuple(sorted(ctx.nonfinite.items()))
        if not counted:
            return writer.commit(before_publish)
        # the journal's entry before the rename carries the counts too: a reused shard reports them
        hook = None if before_publish is None else \
            (lambda written, identity: before_publish(dataclasses.replace(written, nonfinite=counted), identity))
        return dataclasses.replace(writer.commit(hook), nonfinite=counted)

"""Table gathers shared by the quantized formats' CPU paths: code → result bits, one take per element.

Why tables: a quantized element is a function of a handful of bits (an FP8 code and its row's
scale; an E2M1 nibble pair and its group's 8-bit scale code). Building every possible result
with the reference's own torch ops and then gathering is bit-identical to the reference by
construction and skips the float32 intermediates. numpy's take/add/or release the GIL, so
row spans run on the thread pool `fp8_cpu` already keeps.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ckptflow.tasks.kernels.fp8_cpu import _executor, _index_buffer, _threads

STEP_ELEMENTS = 1 << 17  # elements per numpy call: amortises call cost, scratch stays in L2
_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view(t: torch.Tensor) -> np.ndarray:
    """The raw-bits integer numpy view of a contiguous CPU tensor."""
    return t.view(_TORCH_INT[t.element_size()]).numpy()


def out_tensor(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """`out` checked to be a contiguous `shape`/`dtype` tensor on `device`, or a new one.

    Callers that stream into their own buffers (the shard executor) pass `out` and skip a copy."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out


def canonical_nan(values: torch.Tensor) -> torch.Tensor:
    """`values` with every NaN as all-ones bits (bf16 0xFFFF, torch's vectorized-cast NaN).

    torch's own NaN payloads depend on where an element falls in its vector loop (scalar tails
    write 0x7FC0), so a table built with torch ops is made deterministic here, and the Triton
    kernels write the same all-ones NaN."""
    ints = _TORCH_INT[values.element_size()]
    bits = values.contiguous().view(ints)
    return torch.where(values.isnan(), torch.tensor(-1, dtype=ints), bits).view(values.dtype)


def parallel_rows(rows: int, row_elements: int, work: Callable[[int, int], None], max_step: int = 0) -> None:
    """Call `work(a, b)` over [0, rows) in steps of about STEP_ELEMENTS elements, spread over threads."""
    if rows <= 0:
        return
    step = max(1, STEP_ELEMENTS // max(row_elements, 1))
    if max_step:
        step = min(step, max_step)
    spans = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    if len(spans) == 1 or _threads() == 1:
        for a, b in spans:
            work(a, b)
        return
    per = -(-len(spans) // (4 * _threads()))  # ~4 tasks per thread for balance
    tasks = [spans[i:i + per] for i in range(0, len(spans), per)]
    list(_executor().map(lambda chunk: [work(a, b) for a, b in chunk], tasks))


def gather_row_tables(codes: np.ndarray, tables: np.ndarray, out: np.ndarray) -> None:
    """out[r, j] = tables[r, codes[r, j]] (or tables[0, ...] for one shared table).

    `codes` uint8 [rows, n]; `tables` int [rows or 1, 256]; `out` int [rows, n], same item size.
    """
    rows, n = codes.shape
    if tables.shape[0] == 1:
        table = tables[0]
        parallel_rows(rows, n, lambda a, b: np.take(table, codes[a:b], out=out[a:b]))
        return
    flat = tables.reshape(-1)

    def work(a: int, b: int) -> None:
        # uint16 indices (at most 256 rows of 256 entries per step) gather faster than int64
        offs = (np.arange(b - a, dtype=np.uint16) * 256)[:, None]
        idx = np.add(codes[a:b], offs, dtype=np.uint16)
        np.take(flat[a * 256: b * 256], idx, out=out[a:b], mode="clip")

    parallel_rows(rows, n, work, max_step=256)


def gather_scaled_pairs(packed: np.ndarray, scale_codes: np.ndarray, group_bytes: int,
                        table: np.ndarray, out: np.ndarray) -> None:
    """out[r, j] = table[scale_codes[r, j // group_bytes] << 8 | packed[r, j]].

    `packed` uint8 [rows, nb]; `scale_codes` uint8 [rows, ceil(nb / group_bytes)]; `table` int
    [65536], one result pair (low nibble's bits in the low half) per (scale code, byte);
    `out` int [rows, nb].
    """
    rows, nb = packed.shape
    full = nb // group_bytes
    body = full * group_bytes

    def work(a: int, b: int) -> None:
        k = b - a
        # Fill the index with each group's scale code in its high byte (a broadcast copy), then
        # OR the bytes in: two long passes, much faster than one broadcast OR over 8/16-wide rows.
        idx = _index_buffer(k * nb, np.uint16).reshape(k, nb)
        if full:
            body_idx = idx[:, :body].reshape(k, full, group_bytes)
            body_idx[...] = scale_codes[a:b, :full, None]
            np.left_shift(body_idx, 8, out=body_idx)
            np.bitwise_or(body_idx, packed[a:b, :body].reshape(k, full, group_bytes), out=body_idx)
        if body < nb:  # a ragged last group
            tail = idx[:, body:]
            tail[...] = scale_codes[a:b, full:full + 1]
            np.left_shift(tail, 8, out=tail)
            np.bitwise_or(tail, packed[a:b, body:], out=tail)
        np.take(table, idx, out=out[a:b])

    parallel_rows(rows, nb, work)


def pair_table(values: torch.Tensor) -> np.ndarray:
    """From values [256 scale codes, 16 nibbles] (any 2- or 4-byte float dtype), the byte table
    [65536]: entry (s << 8 | byte) holds value[s, byte & 15] in its low half and
    value[s, byte >> 4] in its high half, i.e. the two outputs in memory order (little-endian)."""
    size = values.element_size()
    unsigned = {2: np.uint16, 4: np.uint32}[size]
    bits = values.contiguous().view(_TORCH_INT[size]).numpy().view(unsigned).astype(np.uint64)
    byte = np.arange(256)
    pairs = bits[:, byte & 15] | (bits[:, byte >> 4] << np.uint64(8 * size))
    return pairs.reshape(-1).astype({2: np.uint32, 4: np.uint64}[size]).view(_INT[2 * size])

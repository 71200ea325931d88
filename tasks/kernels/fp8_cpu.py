"""FP8 block-wise dequantization on the CPU, bit-exact and fast.

Semantics (DeepSeek-V3 `weight_scale_inv`): `out[i, j] = out_dtype(float32(w[i, j]) * s[i // bm, j // bn])`.

Why a lookup table: an FP8 code has only 256 values, so within one scale block the result is a
function of the code alone. For each block we compute the 256 possible results with the very
same float32 multiply and rounding torch uses, then map codes to results with one gather per
element. That is bit-identical to the float path by construction and skips the float32
intermediate (4 bytes written and read back per element). Row blocks are split across threads;
numpy's add/take release the GIL.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ckptflow.tasks.kernels.scale_grid import normalise_scale

FP8_TORCH_DTYPES: dict[str, torch.dtype] = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_INT_VIEW = {2: torch.int16, 4: torch.int32}
_STEP_ELEMENTS = 1 << 17  # elements per add+take: amortises numpy's per-call cost, index stays in L2
_MIN_TASK_ELEMENTS = 1 << 17  # below this a thread-pool hop costs more than it saves
_SERIAL_ELEMENTS = 1 << 15  # torch's GRAIN_SIZE: an op on fewer elements runs on the calling thread
_pool: ThreadPoolExecutor | None = None
_scratch = threading.local()


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="ckptflow-fp8")
    return _pool


def _index_buffer(size: int, dtype: type) -> np.ndarray:
    """This thread's reusable index scratch (no malloc/free churn per step)."""
    buf = getattr(_scratch, "idx", None)
    if buf is None or buf.nbytes < size * np.dtype(dtype).itemsize:
        buf = _scratch.idx = np.empty(size * np.dtype(dtype).itemsize, dtype=np.uint8)
    return buf[: size * np.dtype(dtype).itemsize].view(dtype)


def code_values(fp8: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 codes of `fp8` (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(fp8).to(torch.float32)


def block_tables(scales: torch.Tensor, fp8: torch.dtype, out_dtype: torch.dtype) -> np.ndarray:
    """For scales [..., nb]: every code's result per block, as raw integers [..., nb, 256].

    Computed in slices below torch's parallel grain: a table is small, and an OpenMP region per
    chunk would wake torch's threads, which then spin on the cores the gather workers need.
    """
    values = code_values(fp8)
    flat = scales.to(torch.float32).reshape(-1)
    out = torch.empty(flat.numel(), 256, dtype=out_dtype)
    rows = max(1, _SERIAL_ELEMENTS // 256)
    for a in range(0, flat.numel(), rows):
        out[a:a + rows].copy_(flat[a:a + rows, None] * values)  # copy_ rounds as .to() does
    return out.view(_INT_VIEW[out_dtype.itemsize]).numpy().reshape(*scales.shape, 256)


def dequant_rows(codes: np.ndarray, scales: torch.Tensor, block: tuple[int, int],
                 fp8: torch.dtype, out: np.ndarray, out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantize `codes` (uint8 [rows, N], rows starting on a block-row boundary) into `out`.

    `scales` are the matching scale rows, float32 [ceil(rows / bm), ceil(N / bn)]; `out` is the
    integer view (int16 for 2-byte dtypes) of the output, same shape as `codes`.
    """
    rows, n = codes.shape
    bm, bn = block
    nb = scales.shape[1]
    tables = block_tables(scales, fp8, out_dtype).reshape(scales.shape[0], nb * 256)
    # The smallest index type that addresses a row of tables: numpy's gather runs faster on it.
    index_dtype = np.uint16 if nb * 256 <= 1 << 16 else np.int32
    col_offset = ((np.arange(n) // bn) * 256).astype(index_dtype)

    # Tasks are spans of rows inside one block row (so one row of tables each): about four per
    # thread for balance, but none so small that dispatch costs more than the gather.
    threads = _threads()
    span = min(bm, max(-(-rows // (4 * threads)), -(-_MIN_TASK_ELEMENTS // max(n, 1)), 1))
    tasks = [(a, min(a + span, r + bm, rows)) for r in range(0, rows, bm) for a in range(r, min(r + bm, rows), span)]
    step = max(1, _STEP_ELEMENTS // max(n, 1))

    def work(span: tuple[int, int]) -> None:
        a0, b0 = span
        table = tables[a0 // bm]
        idx = _index_buffer(min(step, b0 - a0) * n, index_dtype).reshape(-1, n)
        for a in range(a0, b0, step):
            b = min(a + step, b0)
            np.add(codes[a:b], col_offset, out=idx[:b - a], casting="unsafe")
            np.take(table, idx[:b - a], out=out[a:b], mode="clip")

    if len(tasks) == 1 or threads == 1:
        for span in tasks:
            work(span)
    else:
        list(_executor().map(work, tasks))


def matrix_scales(weight_shape: tuple[int, ...], scale_inv: torch.Tensor, block: tuple[int, int],
                  name: str = "weight") -> tuple[tuple[int, int], torch.Tensor]:
    """The block (bm, bn) and the scales as [matrices, ceil(rows/bm), ceil(cols/bn)] float32.

    A 2-D weight is one matrix, a 3-D one (stacked experts) several; a per-tensor scale becomes
    one 1×1 grid per matrix, its block covering the whole matrix.
    """
    bm, bn = normalise_scale(tuple(weight_shape), tuple(scale_inv.shape), block, name)
    mats = int(np.prod(weight_shape[:-2])) if len(weight_shape) > 2 else 1
    s = scale_inv.detach().cpu().to(torch.float32)
    return (bm, bn), s.reshape(1, 1, 1).expand(mats, 1, 1) if s.numel() == 1 else s.reshape(mats, *s.shape[-2:])


def torch_weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The CPU path on whole tensors: 2-D or 3-D weight, block or per-tensor scale."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"weight must be float8_e4m3fn or float8_e5m2, got {weight.dtype}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"scale_inv must be float32, got {scale_inv.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    (bm, bn), scales = matrix_scales(tuple(weight.shape), scale_inv, block)
    w = weight.detach().cpu().contiguous()
    mats = w.reshape(-1, *w.shape[-2:])
    out = torch.empty(w.shape, dtype=out_dtype)
    out_mats = out.view(_INT_VIEW[out_dtype.itemsize]).reshape(mats.shape)
    for e in range(mats.shape[0]):
        if mats.shape[1] and mats.shape[2]:
            dequant_rows(mats[e].view(torch.uint8).numpy(), scales[e], (bm, bn), weight.dtype,
                         out_mats[e].numpy(), out_dtype)
    return out.to(weight.device)

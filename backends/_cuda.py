"""Helpers both GPU backends (``cupy``, ``numba_cuda``) share: array modules, broadcast plans,
the bias-gradient plan, and the integer window tables of the windowed ops.

The launchers take CuPy arrays (or anything with ``__cuda_array_interface__``, viewed as CuPy
without a copy) on a GPU, and NumPy arrays under the CUDA simulator or the host-C++ test harness,
so the same code is tested on a machine without a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from arrayattn._reference.neighborhood import inverse_windows

__all__ = [
    "PARTIAL_BYTES",
    "DbiasPlan",
    "as_lib",
    "axis_tables",
    "broadcast_plan",
    "dbias_plan",
    "device_tables",
    "head_offsets",
    "lib_of",
    "nblocks",
    "rel_inverse",
]


def lib_of(x):
    """``cupy`` for device arrays, ``numpy`` for host arrays (the simulator's case)."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def as_lib(x):
    """``x`` as an ndarray of its library (a CUDA-array-interface array viewed as CuPy, no copy)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    import cupy

    return x if isinstance(x, cupy.ndarray) else cupy.asarray(x)


def head_offsets(shape, batch, rows, cols):
    """Where each flattened batch index reads a mask/bias of ``shape`` broadcastable to
    ``batch + (rows, cols)`` (C-contiguous): ``(offsets, row_stride, col_stride)``, a NumPy
    int64 array of prod(batch) element offsets (at least one) and the strides in elements (0
    along broadcast axes)."""
    full = tuple(batch) + (rows, cols)
    shape = (1,) * (len(full) - len(shape)) + tuple(shape)
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides = strides[::-1]
    strides = [st if n > 1 else 0 for st, n in zip(strides, shape, strict=True)]
    offs = np.zeros(tuple(batch), dtype=np.int64)
    for axis, (n, st) in enumerate(zip(batch, strides[:-2], strict=True)):
        view = [1] * len(batch)
        view[axis] = n
        offs = offs + (np.arange(n, dtype=np.int64) * st).reshape(view)
    offs = offs.reshape(-1)
    if offs.size == 0:
        offs = np.zeros(1, dtype=np.int64)
    return offs, strides[-2], strides[-1]


def broadcast_plan(lib, a, batch, rows, cols, dtype=None):
    """A mask/bias broadcastable to ``batch + (rows, cols)`` read through its own data.

    Returns ``(flat, offsets, row_stride, col_stride, data)``: the C-contiguous data flattened,
    the element offset of each flattened batch index (a ``lib`` int64 array of prod(batch)), and
    the row/column strides in elements (0 along broadcast axes). Nothing is materialised at the
    broadcast shape.
    """
    data = lib.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))
    offs, rs, cs = head_offsets(data.shape, batch, rows, cols)
    return data.reshape(-1), lib.asarray(offs), rs, cs, data


#: Most bytes of bias-gradient partials held at once; more query heads run in several chunks.
PARTIAL_BYTES = 256 * 1024 * 1024


class DbiasPlan(NamedTuple):
    """How the dQ kernels emit the bias gradient (:func:`dbias_plan`)."""

    rows: bool  # the bias has a query axis (else it broadcasts rows)
    cols: bool  # the bias has a key axis
    nrows: int  # the bias data's extents of those axes (lq or 1, lk or 1)
    ncols: int
    pr: int  # partial rows per query head: lq, or one per query tile
    pc: int  # partial columns: lk or 1
    direct: bool  # partials are the gradient itself (one query head per bias head, no broadcast)
    chunks: tuple  # (bh0, bh1, hptr, hbh) per launch: query heads [bh0, bh1), CSR by bias head
    lanes: int  # threads per gradient element in the reduction (a power of two <= 256)


def dbias_plan(shape, batch, lq, lk, block_q, itemsize, budget=None):
    """The bias-gradient plan of a bias of ``shape`` (broadcastable to ``batch + (lq, lk)``).

    A dQ block (a query head, a tile of ``block_q`` query rows) sums its dS over the axes the
    bias broadcasts inside the block and writes partials of ``pr x pc`` per query head; a
    reduction then sums, for each bias element, the partials of the query heads (and query tiles)
    that read it. The query heads run in chunks so that at most ``budget`` bytes of partials
    exist at once (``PARTIAL_BYTES`` by default; always one head at least); ``hptr``/``hbh``
    list, per bias head, the chunk-local query heads reading it, in order. Cost: every dS value
    is added O(1) times, so O(B·H·Lq·Lk) whatever the bias shape.
    """
    offs, rs, cs = head_offsets(shape, batch, lq, lk)
    rows, cols = rs != 0, cs != 0
    nrows, ncols = (lq if rows else 1), (lk if cols else 1)
    rc = nrows * ncols
    nheads = max(1, math.prod(shape) // rc)
    nqt = -(-lq // block_q)
    pr, pc = (lq if rows else nqt), (lk if cols else 1)
    head = offs // rc
    nb = head.size
    if rows and cols and np.array_equal(head, np.arange(nb)):
        return DbiasPlan(rows, cols, nrows, ncols, pr, pc, True, ((0, nb, None, None),), 1)
    budget = PARTIAL_BYTES if budget is None else budget
    step = max(1, budget // (pr * pc * itemsize))
    chunks, group = [], 1
    for bh0 in range(0, nb, step):
        h = head[bh0 : bh0 + step]
        counts = np.bincount(h, minlength=nheads)
        group = max(group, int(counts.max()))
        hptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        hbh = np.argsort(h, kind="stable").astype(np.int32)
        chunks.append((bh0, min(nb, bh0 + step), hptr, hbh))
    per_element = group * (1 if rows else pr)
    lanes = 1
    while lanes < 256 and lanes * 16 < per_element:  # about 16 sequential adds per lane
        lanes *= 2
    return DbiasPlan(rows, cols, nrows, ncols, pr, pc, False, tuple(chunks), lanes)


def nblocks(n: int, block: int) -> int:
    return max(0, math.ceil(n / block))


# -- window tables --------------------------------------------------------------------------------


def rel_inverse(win):
    """CSR of the relative rows: for row t, every (query position, slot) pair that reads it.

    Returns ``(ptr, pairs)``: ``ptr`` (T+1,), ``pairs`` (2, n) = (position, slot), ordered by
    row, then position, then slot. Every slot is listed, in-image or not (a padded slot of
    ``boundary='zero'`` reads its relative terms; an excluded slot has ``dl = 0``).
    """
    k, length = win.rel.shape
    a, i = np.meshgrid(np.arange(k), np.arange(length), indexing="ij")
    a, i, rows = a.ravel(), i.ravel(), win.rel.ravel()
    order = np.lexsort((a, i, rows))
    counts = np.bincount(rows, minlength=win.table)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return ptr.astype(np.int32), _pairs(i[order], a[order])


def _pairs(pos, slot):
    out = np.zeros((2, max(1, len(pos))), dtype=np.int32)
    out[0, : len(pos)] = pos
    out[1, : len(pos)] = slot
    return out


def axis_tables(win):
    """The int32 NumPy tables of one axis the kernels read.

    ``(tab, inv_ptr, inv, rel_ptr, rel)``: ``tab`` (3, K, L) = key position, in-image flag,
    relative row; the inverse neighbourhood (:func:`inverse_windows`) as ``inv_ptr`` (L+1,) and
    ``inv`` (2, n) = (query position, slot); the relative-row CSR of :func:`rel_inverse`.
    """
    tab = np.stack([win.idx, win.valid.astype(np.int64), win.rel]).astype(np.int32)
    ptr, qi, sl = inverse_windows(win)
    rptr, rel = rel_inverse(win)
    return (np.ascontiguousarray(tab), ptr.astype(np.int32), _pairs(qi, sl), rptr, rel)


_TABLES: dict = {}


def device_tables(lib, win):
    """:func:`axis_tables` as arrays of ``lib`` (cached: the windows are cached objects)."""
    dev = None if lib is np else lib.cuda.Device().id
    key = (id(win), lib.__name__, dev)
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not win:
        if len(_TABLES) > 64:
            _TABLES.clear()
        hit = (win, tuple(lib.asarray(t) for t in axis_tables(win)))
        _TABLES[key] = hit
    return hit[1]

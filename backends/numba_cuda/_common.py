"""Helpers shared by the Numba-CUDA kernels: the array module of an input, broadcast plans,
the device, stream and arguments of a launch.

The launchers take CuPy arrays (or anything with ``__cuda_array_interface__``, viewed as CuPy
without a copy) on a GPU, and NumPy arrays under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
so the same code is tested on a machine without a GPU.

Launches follow CuPy's conventions, as the arrays they read and write are CuPy's: every launcher
runs with its inputs' device current (:func:`on_inputs_device`) and launches on CuPy's current
stream (:func:`caller_stream`), the stream its allocations are ordered on and the caller's later
work runs on; arguments are handed to Numba as device arrays that skip Numba's per-argument
synchronisation of the exporting stream (:func:`launch`), so a launch never blocks the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "DbiasPlan",
    "as_lib",
    "broadcast_plan",
    "caller_stream",
    "dbias_plan",
    "head_offsets",
    "launch",
    "lib_of",
    "numba_dtype",
    "on_inputs_device",
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


def numba_dtype(dtype):
    """The numba scalar type of a float32/float64 dtype."""
    from numba import float32, float64

    return {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]


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


def on_inputs_device(launcher):
    """Run ``launcher(q, ...)`` with ``q``'s device current (a CuPy array's ``device``; nothing
    for NumPy arrays), so its allocations and its launches (Numba attaches to the current
    context) use the inputs' device, not whichever device happens to be current."""

    @functools.wraps(launcher)
    def wrapper(q, *args, **kwargs):
        dev = getattr(q, "device", None)
        with dev if hasattr(dev, "__enter__") else contextlib.nullcontext():
            return launcher(q, *args, **kwargs)

    return wrapper


def caller_stream(lib):
    """The stream to launch on: CuPy's current stream (wrapped by ``cuda.external_stream``; its
    legacy null stream is Numba's default stream), or Numba's default stream for NumPy arrays
    (the simulator, which has no streams)."""
    from numba import cuda

    if lib is np:
        return cuda.default_stream()
    ptr = lib.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def _device_arg(a):
    """A CUDA-array-interface argument as a Numba device array made without synchronising its
    stream (Numba would otherwise synchronise the host with it on every launch); the launch is
    ordered on that same stream. Scalars, NumPy and Numba arrays pass through."""
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        return a
    if getattr(a, "__cuda_ndarray__", False):
        return a
    from numba import cuda

    return cuda.as_cuda_array(a, sync=False)


def launch(kernel, grid, block, stream, *args):
    """``kernel[grid, block, stream](*args)`` with the array arguments as :func:`_device_arg`."""
    kernel[grid, block, stream](*(_device_arg(a) for a in args))

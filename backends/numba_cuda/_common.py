"""Helpers shared by the Numba-CUDA kernels: the array module of an input, broadcast plans.

The launchers take CuPy arrays (or anything with ``__cuda_array_interface__``, viewed as CuPy
without a copy) on a GPU, and NumPy arrays under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
so the same code is tested on a machine without a GPU.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["as_lib", "broadcast_plan", "lib_of", "numba_dtype"]


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


def broadcast_plan(lib, a, batch, rows, cols, dtype=None):
    """A mask/bias broadcastable to ``batch + (rows, cols)`` read through its own data.

    Returns ``(flat, offsets, row_stride, col_stride, data)``: the C-contiguous data flattened,
    the element offset of each flattened batch index (a ``lib`` int64 array of prod(batch)), and
    the row/column strides in elements (0 along broadcast axes). Nothing is materialised at the
    broadcast shape.
    """
    data = lib.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))
    full = tuple(batch) + (rows, cols)
    shape = (1,) * (len(full) - data.ndim) + tuple(data.shape)
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
    return data.reshape(-1), lib.asarray(offs), strides[-2], strides[-1], data


def nblocks(n: int, block: int) -> int:
    return max(0, math.ceil(n / block))

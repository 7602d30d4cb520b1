"""Helpers of the Numba-CUDA kernels: the numba scalar types; the rest is shared with the ``cupy``
backend (:mod:`arrayattn.backends._cuda`)."""

from __future__ import annotations

import numpy as np

from .._cuda import as_lib, broadcast_plan, lib_of, nblocks

__all__ = ["as_lib", "broadcast_plan", "lib_of", "nblocks", "numba_dtype"]


def numba_dtype(dtype):
    """The numba scalar type of a float32/float64 dtype."""
    from numba import float32, float64

    return {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]

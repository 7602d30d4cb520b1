"""Helpers of the Numba-CUDA kernels: numba scalar types, the device, stream and arguments of a
launch; array modules, broadcast and bias-gradient plans are shared with the ``cupy`` backend
(:mod:`arrayattn.backends._cuda`).

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

import numpy as np

from .._cuda import as_lib, broadcast_plan, dbias_plan, lib_of, nblocks

__all__ = [
    "as_lib",
    "broadcast_plan",
    "caller_stream",
    "dbias_plan",
    "launch",
    "lib_of",
    "nblocks",
    "numba_dtype",
    "on_inputs_device",
]


def numba_dtype(dtype):
    """The numba scalar type of a float32/float64 dtype."""
    from numba import float32, float64

    return {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]


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

"""Array-API helpers on top of ``array_api_compat`` used by the reference implementations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

__all__ = [
    "Array",
    "compute_dtype",
    "device_of",
    "flat_rows",
    "is_low_precision",
    "namespace_name",
    "sum_to_shape",
]

Array = Any  # any array of an array-API namespace


def device_of(x: Array) -> Any:
    return array_api_compat.device(x)


def namespace_name(xp: Any) -> str:
    """A short, stable name for a namespace (``numpy``, ``cupy``, ``torch``, ``jax``, ...)."""
    for name, test in (
        ("numpy", array_api_compat.is_numpy_namespace),
        ("cupy", array_api_compat.is_cupy_namespace),
        ("torch", array_api_compat.is_torch_namespace),
        ("jax", array_api_compat.is_jax_namespace),
        ("dask", array_api_compat.is_dask_namespace),
        ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
    ):
        if test(xp):
            return name
    return getattr(xp, "__name__", repr(xp))


def flat_rows(xp: Any, x: Array) -> Array:
    """``x`` as a matrix (rows = every leading position, columns = the last axis).

    Spelled with the row count rather than ``-1``, which is ambiguous (an error) for a
    zero-width last axis.
    """
    return xp.reshape(x, (math.prod(x.shape[:-1]), x.shape[-1]))


def is_low_precision(xp: Any, dtype: Any) -> bool:
    return dtype != xp.float32 and dtype != xp.float64


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype reductions and matrix products run in: float32 for float16/bfloat16, else dtype."""
    return xp.float32 if is_low_precision(xp, dtype) else dtype


def sum_to_shape(xp: Any, x: Array, shape: Sequence[int]) -> Array:
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to ``x.shape``.

    This is the adjoint of ``broadcast_to(a, x.shape)`` for ``a`` of the given shape.
    """
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    if lead:
        x = xp.sum(x, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return x

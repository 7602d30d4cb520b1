"""Helpers shared by the test modules: namespaces, conversions, tolerances, backend kernels."""

from __future__ import annotations

import importlib

import array_api_compat
import numpy as np
import pytest

import arrayattn as aa

NAMESPACES = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def load_namespace(name: str):
    """The array-API namespace called ``name``, or skip the test when it is not usable here."""
    if name == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    if name == "cupy":
        cupy = pytest.importorskip("cupy")
        if not cupy.cuda.is_available():
            pytest.skip("cupy: no CUDA device")
        return array_api_compat.array_namespace(cupy.empty(0))
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        import jax

        jax.config.update("jax_enable_x64", True)
        return array_api_compat.array_namespace(jnp.empty(0))
    if name == "torch":
        torch = pytest.importorskip("torch")
        return array_api_compat.array_namespace(torch.empty(0))
    return importlib.import_module(pytest.importorskip(name).__name__)


def to_xp(xp, a):
    """A NumPy array (or None, or a dict of them) as an array of ``xp``."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: to_xp(xp, v) for k, v in a.items()}
    return xp.asarray(np.asarray(a))


def to_numpy(x):
    """Any array (or tuple/dict/None of them) as NumPy."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(to_numpy(e) for e in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        return np.asarray(x.__array__() if hasattr(x, "__array__") else x._array)
    return np.asarray(x)


def has_kernel(op, backend: str) -> bool:
    """Whether ``backend`` is available here and implements ``op``."""
    for info in aa.backends():
        if info.name == backend:
            return info.available and info.ops is not None and op.name in info.ops
    raise ValueError(backend)


def require_kernel(op, backend: str) -> None:
    if not has_kernel(op, backend):
        pytest.skip(f"backend {backend} has no kernel for {op.name} here")


#: Forward/backward agreement of a backend with the float64 oracle, by dtype (relative to max |ref|).
RTOL = {np.float64: 1e-10, np.float32: 2e-5}

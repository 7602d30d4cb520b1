"""The ``numba`` backend: fused parallel CPU kernels (``@njit``) for NumPy arrays.

Kernels live in one module per mechanism family (as in ``arrayattn/``), each with a ``KERNELS``
table; the registry finds the modules itself. Importing this package imports nothing heavy: numba
is imported by the probe and by the kernel modules, when a call could run here.
"""

from arrayattn._registry import BackendSpec


def _probe() -> str | None:
    try:
        import numba  # noqa: F401
    except Exception as exc:  # ImportError, or a numba/numpy version mismatch
        return f"numba cannot be imported ({exc}); install the 'numba' extra"
    return None


BACKEND = BackendSpec(
    "numba",
    "fused parallel CPU kernels (@njit) for NumPy arrays",
    namespaces=("numpy",),
    probe=_probe,
    priority=10,
)

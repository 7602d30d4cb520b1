"""The ``numba_cuda`` backend: ``@cuda.jit`` kernels for CuPy arrays.

Kernels live in one module per mechanism family (as in ``arrayattn/``), each with a ``KERNELS``
table; the registry finds the modules itself. Importing this package imports nothing heavy.
"""

from arrayattn._registry import BackendSpec


def _probe() -> str | None:
    try:
        from numba import cuda
    except Exception as exc:
        return f"numba.cuda cannot be imported ({exc}); install the 'cuda12' or 'cuda13' extra"
    try:
        if not cuda.is_available():
            return "numba.cuda is installed but no CUDA device is visible"
    except Exception as exc:
        return f"numba.cuda cannot reach the CUDA driver ({exc})"
    return None


BACKEND = BackendSpec(
    "numba_cuda",
    "@cuda.jit kernels for CuPy arrays",
    namespaces=("cupy",),
    probe=_probe,
    priority=20,
)

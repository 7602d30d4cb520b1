"""The ``cupy`` backend: CUDA C kernels (``cupy.RawModule``) for CuPy arrays.

Kernels live in one module per mechanism family (as in ``arrayattn/``), each with a ``KERNELS``
table; the registry finds the modules itself. Importing this package imports nothing heavy.
"""

from arrayattn._registry import BackendSpec


def _probe() -> str | None:
    try:
        import cupy
    except Exception as exc:
        return f"cupy cannot be imported ({exc}); install the 'cuda12' or 'cuda13' extra"
    try:
        if not cupy.cuda.is_available():
            return "cupy is installed but no CUDA device is visible"
    except Exception as exc:
        return f"cupy cannot reach the CUDA driver ({exc})"
    return None


BACKEND = BackendSpec(
    "cupy",
    "CUDA C kernels (cupy.RawModule) for CuPy arrays",
    namespaces=("cupy",),
    probe=_probe,
    priority=30,
)

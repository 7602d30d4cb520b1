"""The CBLAS ``sgemm``/``dgemm`` of the OpenBLAS that NumPy ships, callable from compiled code.

The symbols are bound as external functions (so ``cache=True`` works) and OpenBLAS is kept
single-threaded while our own parallel regions run: both thread pools on the same cores would
otherwise spin against each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
from contextlib import contextmanager

import llvmlite.binding as llvm
import numpy as np
from numba import types
from numba.extending import overload

from arrayattn._kernel import requirement

__all__ = ["BLAS", "BLAS_REASON", "HAS_BLAS", "blas_threads", "gemm", "single_threaded_blas"]


# -- BLAS ------------------------------------------------------------------------------------------


def _find_openblas():
    """NumPy's bundled OpenBLAS: (library, symbol prefix, symbol suffix), or None."""
    libdir = os.path.dirname(np.__file__) + ".libs"
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            if hasattr(lib, f"scipy_cblas_sgemm{suffix}") and hasattr(
                lib, f"scipy_openblas_set_num_threads{suffix}"
            ):
                return lib, suffix
    return None


_BLAS = _find_openblas()
BLAS_REASON = (
    None
    if _BLAS is not None
    else (
        "no CBLAS found: the numba attention kernels call the OpenBLAS bundled with NumPy wheels "
        "(numpy.libs/libscipy_openblas*), which this NumPy does not have"
    )
)

_i32, _i64 = types.int32, types.int64
_BLAS_INT = _i64 if (_BLAS is not None and _BLAS[1] == "64_") else _i32
_sgemm = types.ExternalFunction(
    "arrayattn_cblas_sgemm",
    types.void(
        _i32,
        _i32,
        _i32,
        _BLAS_INT,
        _BLAS_INT,
        _BLAS_INT,
        types.float32,
        _i64,
        _BLAS_INT,
        _i64,
        _BLAS_INT,
        types.float32,
        _i64,
        _BLAS_INT,
    ),
)
_dgemm = types.ExternalFunction(
    "arrayattn_cblas_dgemm",
    types.void(
        _i32,
        _i32,
        _i32,
        _BLAS_INT,
        _BLAS_INT,
        _BLAS_INT,
        types.float64,
        _i64,
        _BLAS_INT,
        _i64,
        _BLAS_INT,
        types.float64,
        _i64,
        _BLAS_INT,
    ),
)
if _BLAS is not None:
    _lib, _sfx = _BLAS
    for _name, _sym in (
        ("sgemm", f"scipy_cblas_sgemm{_sfx}"),
        ("dgemm", f"scipy_cblas_dgemm{_sfx}"),
    ):
        llvm.add_symbol(
            f"arrayattn_cblas_{_name}", ctypes.cast(getattr(_lib, _sym), ctypes.c_void_p).value
        )
    _get_threads = getattr(_lib, f"scipy_openblas_get_num_threads{_sfx}")
    _get_threads.restype = ctypes.c_int
    _set_threads = getattr(_lib, f"scipy_openblas_set_num_threads{_sfx}")
    _set_threads.argtypes = [ctypes.c_int]

_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = 1


@contextmanager
def single_threaded_blas():
    """OpenBLAS runs single-threaded inside our parallel region (restored afterwards)."""
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = _get_threads()
            if _blas_saved != 1:
                _set_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved != 1:
                _set_threads(_blas_saved)


def blas_threads(parallel):
    """For kernels with serial twins: a call too small for the parallel twin keeps OpenBLAS
    single-threaded too, since its products take well under a millisecond, less than waking the
    BLAS thread pool costs on a busy machine; a parallel call leaves BLAS as it is."""
    if parallel or BLAS_REASON is not None:
        return contextlib.nullcontext()
    return single_threaded_blas()


_ROW, _NT, _T = 101, 111, 112  # CblasRowMajor, CblasNoTrans, CblasTrans


def gemm(ta, tb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc):
    """Row-major ``C = alpha·op(A)·op(B) + beta·C`` on arrays + element offsets (Numba only)."""
    raise NotImplementedError


@overload(gemm)
def _gemm_overload(ta, tb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc):
    if a.dtype == types.float32:
        fn, cast, size = _sgemm, np.float32, 4
    elif a.dtype == types.float64:
        fn, cast, size = _dgemm, np.float64, 8
    else:
        return None

    def impl(ta, tb, m, n, k, alpha, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc):
        fn(
            _ROW,
            _T if ta else _NT,
            _T if tb else _NT,
            m,
            n,
            k,
            cast(alpha),
            np.int64(a.ctypes.data) + aoff * size,
            max(lda, 1),
            np.int64(b.ctypes.data) + boff * size,
            max(ldb, 1),
            cast(beta),
            np.int64(c.ctypes.data) + coff * size,
            max(ldc, 1),
        )

    return impl


HAS_BLAS = _BLAS is not None


@requirement("NumPy's bundled OpenBLAS (for the in-kernel GEMMs)")
def BLAS(call):  # noqa: N802 - a requirement constant, declared with the decorator
    return BLAS_REASON

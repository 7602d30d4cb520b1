"""Helpers shared by the benchmark modules: backend availability, warm-up, sgemm rate, timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

#: Backends the CPU suite is parametrized by (GPU backends need GPU inputs and a GPU machine).
CPU_BACKENDS = ("array_api", "numba")
DTYPES = ("float32", "float64")


def require_backend(backend: str, op_name: str) -> None:
    """Raise ``NotImplementedError`` (asv: skip) unless ``backend`` is here and has ``op_name``."""
    import arrayattn as aa

    if backend == "array_api":
        return  # always available, covers every op; don't import (and probe) the other backends
    for info in aa.backends():
        if info.name == backend:
            if not info.available:
                raise NotImplementedError(f"{backend} unavailable: {info.reason}")
            if op_name not in (info.ops or ()):
                raise NotImplementedError(f"{backend} has no kernel for {op_name}")
            return
    raise NotImplementedError(f"unknown backend {backend!r}")


def build(case_name: str, params: dict, dtype: str, mode: str, backend: str) -> Callable[[], Any]:
    """The case's arrayattn runner under ``backend``, called once (JIT compile, warm caches).

    A ``BackendError`` (the kernel declines this dtype or size) becomes ``NotImplementedError``,
    so asv skips the combination instead of failing it.
    """
    import arrayattn as aa
    from arrayattn._bench.cases import CASES

    runner = CASES[case_name].arrayattn(params, dtype, mode)

    def run():
        with aa.use_backend(backend):
            return runner()

    try:
        run()
    except aa.BackendError as exc:
        raise NotImplementedError(str(exc)) from None
    return run


def median_seconds(run: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgemm_gflops() -> float:
    """This machine's float32 matrix-multiply rate (NumPy's BLAS, 2048³), as ``bench`` measures it:
    a median of 5 calls in a worker process of its own."""
    from arrayattn._bench import sgemm_rate

    return sgemm_rate(None)

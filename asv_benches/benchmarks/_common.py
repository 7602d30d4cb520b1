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


class _CaseBenchmark:
    """asv benchmarks of one ``arrayattn._bench`` case, parametrized by backend and size.

    Subclasses set ``case`` (the case name), ``op`` (the op whose kernel decides whether a backend
    is available; for a composite op, the op it dispatches) and ``sizes`` (name -> case params),
    and list ``params = [list(CPU_BACKENDS), list(sizes)]``. ``track_time_over_torch`` times
    arrayattn and the case's PyTorch runner each in a process of its own with alternating calls.
    """

    case: str
    op: str
    sizes: dict
    param_names = ["backend", "size"]
    timeout = 900
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup_cache(self):
        return sgemm_gflops()

    def setup(self, sgemm, backend, size):
        from arrayattn._bench.cases import CASES

        require_backend(backend, self.op)
        self.p = dict(self.sizes[size])
        self.flops = CASES[self.case].flops(self.p, "fwd_bwd")
        self.fwd = build(self.case, self.p, "float32", "fwd", backend)  # also warms the JIT
        self.fwd_bwd = build(self.case, self.p, "float32", "fwd_bwd", backend)
        self.backend = backend

    def time_fwd(self, sgemm, backend, size):
        self.fwd()

    def time_fwd_bwd(self, sgemm, backend, size):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, sgemm, backend, size):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, sgemm, backend, size):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"

    def track_fraction_of_sgemm(self, sgemm, backend, size):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9 / sgemm

    track_fraction_of_sgemm.unit = "fraction of sgemm"

    def track_time_over_torch(self, sgemm, backend, size):
        from arrayattn._bench import compare

        try:
            import torch  # noqa: F401  (only whether it is installed)
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        base = {
            "case": self.case,
            "params": self.p,
            "dtype": "float32",
            "mode": "fwd_bwd",
            "threads": None,
        }
        ours, theirs = compare(
            [{**base, "impl": "arrayattn", "backend": self.backend}, {**base, "impl": "torch"}], 5
        )
        return statistics.median(ours) / statistics.median(theirs)

    track_time_over_torch.unit = "ratio"

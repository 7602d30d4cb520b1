"""Criss-cross attention (inputs from ``cases_criss_cross``): B=2, dk=8, dv=64, square maps.

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd`` (peak RSS of the benchmark process),
``track_gflops_fwd_bwd`` (2·pixels·(H+W-1)·(dk+dv) FLOP forward, 3 times that with backward).
Combinations a backend cannot run are skipped (``NotImplementedError`` in ``setup``).
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend


class CrissCross:
    param_names = ["backend", "dtype", "HW"]
    params = [list(CPU_BACKENDS), list(DTYPES), [32, 64]]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup(self, backend, dtype, hw):
        from arrayattn._bench.cases import CASES

        require_backend(backend, "criss_cross_attention")
        p = {"B": 2, "H": hw, "W": hw, "dk": 8, "dv": 64}
        self.flops = CASES["criss_cross"].flops(p, "fwd_bwd")
        self.fwd = build("criss_cross", p, dtype, "fwd", backend)
        self.fwd_bwd = build("criss_cross", p, dtype, "fwd_bwd", backend)

    def time_fwd(self, backend, dtype, hw):
        self.fwd()

    def time_fwd_bwd(self, backend, dtype, hw):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, dtype, hw):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, backend, dtype, hw):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"

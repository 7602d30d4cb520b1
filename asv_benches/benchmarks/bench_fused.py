"""Fused attention (inputs from ``cases_fused``): B=32 sets, M=8 queries, d=64, L keys."""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend


class Fused:
    param_names = ["backend", "dtype", "L"]
    params = [list(CPU_BACKENDS), list(DTYPES), [1024, 4096]]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup(self, backend, dtype, length):
        require_backend(backend, "fused_attention")
        from arrayattn._bench.cases import CASES

        p = {"B": 32, "M": 8, "L": length, "d": 64}
        self.flops = CASES["fused"].flops(p, "fwd_bwd")
        self.fwd = build("fused", p, dtype, "fwd", backend)
        self.fwd_bwd = build("fused", p, dtype, "fwd_bwd", backend)

    def time_fwd(self, backend, dtype, length):
        self.fwd()

    def time_fwd_bwd(self, backend, dtype, length):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, dtype, length):
        self.fwd_bwd()

    def track_gflops(self, backend, dtype, length):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops.unit = "GFLOP/s"

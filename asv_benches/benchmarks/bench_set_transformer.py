"""Set Transformer ISAB block, official-code variant (inputs from ``cases_set_transformer``):
N=16 sets of n elements, d=128, m=32 inducing points, 4 heads."""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend


class ISAB:
    param_names = ["backend", "dtype", "n"]
    params = [list(CPU_BACKENDS), list(DTYPES), [256, 1024]]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup(self, backend, dtype, n):
        require_backend(backend, "isab")
        from arrayattn._bench.cases import CASES

        p = {"N": 16, "n": n, "d": 128, "m": 32, "heads": 4}
        self.flops = CASES["isab"].flops(p, "fwd_bwd")
        self.fwd = build("isab", p, dtype, "fwd", backend)
        self.fwd_bwd = build("isab", p, dtype, "fwd_bwd", backend)

    def time_fwd(self, backend, dtype, n):
        self.fwd()

    def time_fwd_bwd(self, backend, dtype, n):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, dtype, n):
        self.fwd_bwd()

    def track_gflops(self, backend, dtype, n):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops.unit = "GFLOP/s"

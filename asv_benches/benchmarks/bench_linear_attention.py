"""Efficient attention and linear attention (inputs from ``cases_linear_attention``).

Parametrized by the length L = 1k ... 64k to show the linear growth (B=1, H=1, d=dv=64).
Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` and
``track_us_per_position`` (forward+backward time per position: flat when the cost is linear).
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend


class _Linear:
    case: str
    op: str
    causal = 0
    param_names = ["backend", "dtype", "L"]
    params = [list(CPU_BACKENDS), list(DTYPES), [1024, 4096, 16384, 65536]]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup(self, backend, dtype, length):
        from arrayattn._bench.cases import CASES

        require_backend(backend, self.op)
        p = {"B": 1, "H": 1, "L": length, "d": 64, "causal": self.causal}
        self.length = length
        self.flops = CASES[self.case].flops(p, "fwd_bwd")
        self.fwd = build(self.case, p, dtype, "fwd", backend)
        self.fwd_bwd = build(self.case, p, dtype, "fwd_bwd", backend)

    def time_fwd(self, backend, dtype, length):
        self.fwd()

    def time_fwd_bwd(self, backend, dtype, length):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, dtype, length):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, backend, dtype, length):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"

    def track_us_per_position(self, backend, dtype, length):
        return median_seconds(self.fwd_bwd, 3) / length * 1e6

    track_us_per_position.unit = "us"


class EfficientAttention(_Linear):
    case = op = "efficient_attention"


class LinearAttention(_Linear):
    case = op = "linear_attention"


class CausalLinearAttention(_Linear):
    case = op = "linear_attention"
    causal = 1

"""Sparse Transformer attention (inputs from ``cases_sparse``): strided, l = 128, d = 64.

``SparseStrided`` times :func:`arrayattn.sparse_attention`; ``DenseMaskedStrided`` the dense
masked :func:`arrayattn.scaled_dot_product_attention` with the same mask on the same backend
(its ratio is the issue's target). Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``,
``track_gflops_fwd_bwd`` (4·attended pairs·d FLOP forward, 3.5 times with backward).
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, build, median_seconds, require_backend


class _Sparse:
    case: str
    op: str
    param_names = ["backend", "L"]
    params = [list(CPU_BACKENDS), [2048, 8192]]
    timeout = 600
    number = 1
    repeat = (1, 5, 30.0)
    warmup_time = 0.0

    def setup(self, backend, length):
        from arrayattn._bench.cases import CASES

        require_backend(backend, self.op)
        p = {"B": 1, "H": 1, "L": length, "l": 128, "d": 64}
        self.flops = CASES[self.case].flops(p, "fwd_bwd")
        self.fwd = build(self.case, p, "float32", "fwd", backend)
        self.fwd_bwd = build(self.case, p, "float32", "fwd_bwd", backend)

    def time_fwd(self, backend, length):
        self.fwd()

    def time_fwd_bwd(self, backend, length):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, length):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, backend, length):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"


class SparseStrided(_Sparse):
    case, op = "sparse_strided", "sparse_attention"


class DenseMaskedStrided(_Sparse):
    case, op = "sparse_strided_dense", "scaled_dot_product_attention"

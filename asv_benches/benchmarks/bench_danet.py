"""DANet position and channel attention (inputs from ``arrayattn._bench.cases_danet``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` and
``track_fraction_of_sgemm`` (FLOP counts of ``cases_danet``), and ``track_time_over_torch``: the
median forward+backward time over that of ``junfu1115/DANet``'s modules in PyTorch (same weights,
CPU), each timed in a process of its own with alternating calls, as ``python -m arrayattn bench``.
Both ops are composite: under ``numba`` their attention core runs on numba's SDPA kernel.
"""

from __future__ import annotations

import statistics

from ._common import CPU_BACKENDS, build, median_seconds, require_backend, sgemm_gflops

SIZES = {"small": {"N": 2, "C": 64, "H": 16, "W": 16}, "paper": {"N": 4, "C": 256, "H": 32, "W": 32}}


class _Block:
    case: str
    param_names = ["backend", "size"]
    params = [list(CPU_BACKENDS), list(SIZES)]
    timeout = 900
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup_cache(self):
        return sgemm_gflops()

    def setup(self, sgemm, backend, size):
        from arrayattn._bench.cases import CASES

        require_backend(backend, "scaled_dot_product_attention")  # the core of a composite op
        self.p = dict(SIZES[size])
        self.flops = CASES[self.case].flops(self.p, "fwd_bwd")
        self.fwd = build(self.case, self.p, "float32", "fwd", backend)
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
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        base = {"case": self.case, "params": self.p, "dtype": "float32", "mode": "fwd_bwd", "threads": None}
        ours, theirs = compare([{**base, "impl": "arrayattn", "backend": self.backend}, {**base, "impl": "torch"}], 5)
        return statistics.median(ours) / statistics.median(theirs)

    track_time_over_torch.unit = "ratio"


class PositionAttention(_Block):
    case = "position_attention"


class ChannelAttention(_Block):
    case = "channel_attention"

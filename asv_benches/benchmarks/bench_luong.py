"""Bahdanau (additive) and Luong local-p attention (inputs from ``cases_luong``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` (FLOP
counts in ``cases_luong``; tanh counted as one operation) and ``track_time_over_torch``: the
median forward+backward time of arrayattn over that of an OpenNMT-py-style PyTorch
implementation, each timed in a process of its own (``arrayattn._bench.compare``). Unavailable
backends are skipped.
"""

from __future__ import annotations

import statistics

from ._common import CPU_BACKENDS, build, median_seconds, require_backend


def _cases():
    from arrayattn._bench.cases import CASES

    return CASES


class _Luong:
    case: str
    op: str
    sizes: dict
    param_names = ["backend", "size"]
    timeout = 900
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def setup(self, backend, size):
        require_backend(backend, self.op)
        self.p = dict(self.sizes[size])
        self.flops = _cases()[self.case].flops(self.p, "fwd_bwd")
        self.fwd = build(self.case, self.p, "float32", "fwd", backend)  # also warms the JIT
        self.fwd_bwd = build(self.case, self.p, "float32", "fwd_bwd", backend)
        self.backend = backend

    def time_fwd(self, backend, size):
        self.fwd()

    def time_fwd_bwd(self, backend, size):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, size):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, backend, size):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"

    def track_time_over_torch(self, backend, size):
        from arrayattn._bench import compare

        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        base = {"case": self.case, "params": self.p, "dtype": "float32", "mode": "fwd_bwd", "threads": None}
        ours, theirs = compare([{**base, "impl": "arrayattn", "backend": self.backend}, {**base, "impl": "torch"}], 5)
        return statistics.median(ours) / statistics.median(theirs)

    track_time_over_torch.unit = "ratio"


class Bahdanau(_Luong):
    """``bahdanau_attention`` vs OpenNMT-py ``mlp`` attention in PyTorch."""

    case = "bahdanau"
    op = "bahdanau_attention"
    sizes = {
        "small": {"N": 4, "T": 16, "S": 32, "d": 64, "da": 64},
        "nmt": {"N": 16, "T": 32, "S": 64, "d": 256, "da": 128},
    }
    params = [list(CPU_BACKENDS), list(sizes)]


class LuongLocalP(_Luong):
    """``local_attention`` (local-p, general score, D = 10) vs a dense PyTorch implementation."""

    case = "luong_local_p"
    op = "local_attention"
    sizes = {
        "small": {"N": 4, "T": 16, "S": 64, "d": 64, "dp": 32, "D": 10},
        "nmt": {"N": 16, "T": 64, "S": 256, "d": 256, "dp": 128, "D": 10},
    }
    params = [list(CPU_BACKENDS), list(sizes)]

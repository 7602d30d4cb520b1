"""Channel-attention blocks (SE, CBAM) and the conv2d primitive (inputs from ``cases_channel``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` and
``track_fraction_of_sgemm`` (conv2d: 2·N·O·C·k²·H·W FLOP forward, 3 times that forward+backward;
the memory-bound blocks count their elementwise work), and ``track_time_over_torch``: the median
forward+backward time of arrayattn over that of the same block in PyTorch (CPU, same weights),
each timed in a process of its own with alternating calls (``arrayattn._bench.compare``), as
``python -m arrayattn bench`` reports it. Unavailable backends are skipped.
"""

from __future__ import annotations

import statistics

from ._common import CPU_BACKENDS, build, median_seconds, require_backend, sgemm_gflops

_BLOCK_SIZES = ("small", "paper")
_BLOCK = {"small": {"N": 8, "C": 64, "H": 28, "W": 28, "r": 16}, "paper": {"N": 32, "C": 256, "H": 28, "W": 28, "r": 16}}


def _cases():
    from arrayattn._bench.cases import CASES

    return CASES


class _Block:
    case: str
    op: str
    param_names = ["backend", "size"]
    params = [list(CPU_BACKENDS), list(_BLOCK_SIZES)]
    timeout = 900
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0
    sizes = _BLOCK

    def setup_cache(self):
        return sgemm_gflops()

    def setup(self, sgemm, backend, size):
        require_backend(backend, self.op)
        self.p = dict(self.sizes[size])
        self.flops = _cases()[self.case].flops(self.p, "fwd_bwd")
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


class SqueezeExcitation(_Block):
    """``squeeze_excitation`` vs a PyTorch SE block; paper size x (32, 256, 28, 28), r = 16."""

    case = "squeeze_excitation"
    op = "squeeze_excitation"


class CBAM(_Block):
    """``cbam`` vs a PyTorch CBAM block (no BN); paper size x (32, 256, 28, 28), r = 16, 7×7."""

    case = "cbam"
    op = "cbam"


class Conv2d(_Block):
    """The ``conv2d`` primitive, 3×3, padding 1, vs ``torch.nn.functional.conv2d``."""

    case = "conv2d"
    op = "conv2d"
    params = [list(CPU_BACKENDS), ["small", "resnet"]]
    sizes = {"small": {"N": 2, "C": 32, "O": 32, "H": 28, "W": 28, "k": 3},
             "resnet": {"N": 8, "C": 64, "O": 64, "H": 56, "W": 56, "k": 3}}

"""Bahdanau (additive) and Luong local-p attention (inputs from ``cases_luong``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` (FLOP
counts in ``cases_luong``; tanh counted as one operation) and ``track_time_over_torch``: the
median forward+backward time of arrayattn over that of an OpenNMT-py-style PyTorch
implementation, each timed in a process of its own (``arrayattn._bench.compare``). Unavailable
backends are skipped.
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, _CaseBenchmark


class Bahdanau(_CaseBenchmark):
    """``bahdanau_attention`` vs OpenNMT-py ``mlp`` attention in PyTorch."""

    case = "bahdanau"
    op = "bahdanau_attention"
    sizes = {
        "small": {"N": 4, "T": 16, "S": 32, "d": 64, "da": 64},
        "nmt": {"N": 16, "T": 32, "S": 64, "d": 256, "da": 128},
    }
    params = [list(CPU_BACKENDS), list(sizes)]


class LuongLocalP(_CaseBenchmark):
    """``local_attention`` (local-p, general score, D = 10) vs a dense PyTorch implementation."""

    case = "luong_local_p"
    op = "local_attention"
    sizes = {
        "small": {"N": 4, "T": 16, "S": 64, "d": 64, "dp": 32, "D": 10},
        "nmt": {"N": 16, "T": 64, "S": 256, "d": 256, "dp": 128, "D": 10},
    }
    params = [list(CPU_BACKENDS), list(sizes)]

"""DANet position and channel attention (inputs from ``arrayattn._bench.cases_danet``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` and
``track_fraction_of_sgemm`` (FLOP counts of ``cases_danet``), and ``track_time_over_torch``: the
median forward+backward time over that of ``junfu1115/DANet``'s modules in PyTorch (same weights,
CPU), each timed in a process of its own with alternating calls, as ``python -m arrayattn bench``.
Both ops are composite: under ``numba`` their attention core runs on numba's SDPA kernel.
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, _CaseBenchmark

SIZES = {
    "small": {"N": 2, "C": 64, "H": 16, "W": 16},
    "paper": {"N": 4, "C": 256, "H": 32, "W": 32},
}


class _Block(_CaseBenchmark):
    # Composite ops: a backend is available when it runs their attention core.
    op = "scaled_dot_product_attention"
    params = [list(CPU_BACKENDS), list(SIZES)]
    sizes = SIZES


class PositionAttention(_Block):
    case = "position_attention"


class ChannelAttention(_Block):
    case = "channel_attention"

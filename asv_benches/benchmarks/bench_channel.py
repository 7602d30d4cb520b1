"""Channel-attention blocks (SE, CBAM) and the conv2d primitive (inputs from ``cases_channel``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd``, ``track_gflops_fwd_bwd`` and
``track_fraction_of_sgemm`` (conv2d: 2·N·O·C·k²·H·W FLOP forward, 3 times that forward+backward;
the memory-bound blocks count their elementwise work), and ``track_time_over_torch``: the median
forward+backward time of arrayattn over that of the same block in PyTorch (CPU, same weights),
each timed in a process of its own with alternating calls (``arrayattn._bench.compare``), as
``python -m arrayattn bench`` reports it. Unavailable backends are skipped.
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, _CaseBenchmark

_BLOCK_SIZES = ("small", "paper")
_BLOCK = {
    "small": {"N": 8, "C": 64, "H": 28, "W": 28, "r": 16},
    "paper": {"N": 32, "C": 256, "H": 28, "W": 28, "r": 16},
}


class _Block(_CaseBenchmark):
    params = [list(CPU_BACKENDS), list(_BLOCK_SIZES)]
    sizes = _BLOCK


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
    sizes = {
        "small": {"N": 2, "C": 32, "O": 32, "H": 28, "W": 28, "k": 3},
        "resnet": {"N": 8, "C": 64, "O": 64, "H": 56, "W": 56, "k": 3},
    }

"""Non-local block, embedded Gaussian with 2×2 subsampling (inputs from ``cases_non_local``).

Same figures as :mod:`bench_danet` (``track_time_over_torch`` against AlexHex7's block semantics in
PyTorch, BN omitted). Composite op: under ``numba`` the attention core runs on numba's SDPA kernel.
"""

from __future__ import annotations

from .bench_danet import SIZES, _Block

__all__ = ["NonLocalBlock"]


class NonLocalBlock(_Block):
    case = "non_local_block"
    params = [_Block.params[0], list(SIZES)]

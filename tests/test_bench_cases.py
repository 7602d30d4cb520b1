"""The two sides of a benchmark case compute the same thing (float64, tiny sizes).

A speed ratio means something only if arrayattn and the PyTorch re-implementation it is timed
against agree; checked here for the cases built from ``pair_op_runner`` (outputs, and the
gradients of both array inputs).
"""

from __future__ import annotations

import numpy as np
import pytest

from arrayattn._bench.cases import CASES
from support import assert_close_rel

pytest.importorskip("torch")

TINY = {
    "bahdanau": {"N": 2, "T": 5, "S": 7, "d": 8, "da": 6},
    "luong_local_p": {"N": 2, "T": 5, "S": 16, "d": 8, "dp": 4, "D": 2},
    "cosnet": {"N": 2, "C": 8, "H": 4, "W": 5},
    "coda": {"N": 2, "La": 8, "Lb": 9, "d": 12, "k": 6},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_sides_agree(name):
    case = CASES[name]
    p = TINY[name]
    ours, theirs = case.arrayattn(p, "float64", "fwd")(), case.torch(p, "float64", "fwd")()
    for x, y in zip(ours, theirs, strict=True):
        assert_close_rel(x, y.numpy(), 1e-12, f"{name} output")
    g, gt = case.arrayattn(p, "float64", "fwd_bwd")(), case.torch(p, "float64", "fwd_bwd")()
    for x, y in zip(
        g[:2], gt[:2], strict=True
    ):  # the two array inputs (torch's leaves start with them)
        assert_close_rel(x, y.numpy(), 1e-10, f"{name} gradient")
    assert np.isfinite(np.asarray(g[0])).all()

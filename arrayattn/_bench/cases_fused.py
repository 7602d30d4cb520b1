"""Benchmark case of fused attention (M queries pooled into one output)."""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _flops(p: dict, mode: str) -> float:
    # scores (2·M·L·d) + pooling (2·L·dv) per batch element; backward about twice the forward.
    fwd = p["B"] * (2.0 * p["M"] * p["L"] * p["d"] + 2.0 * p["L"] * p["d"])
    return fwd if mode == "fwd" else 3.0 * fwd


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((p["B"], p["M"], p["d"]), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((p["B"], p["L"], p["d"]), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((p["B"], p["L"], p["d"]), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((p["B"], p["d"]), dtype=np.float32).astype(dtype)
    return q, k, v, dy


def _arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, dy = _inputs(p, dtype)
    op = aa.fused_attention
    if mode == "fwd":
        return lambda: op(q, k, v)

    def run():
        out, res = op.fwd(q, k, v)
        return op.bwd(res, dy)

    return run


def _torch(p: dict, dtype: str, mode: str):
    """PyTorch: the mean over the M rows of ``F.scaled_dot_product_attention`` (the identity)."""
    import torch
    import torch.nn.functional as F

    q, k, v, dy = (torch.from_numpy(a) for a in _inputs(p, dtype))
    return torch_runner(
        lambda: F.scaled_dot_product_attention(q, k, v).mean(dim=-2), (q, k, v), dy, mode
    )


CASES: dict[str, Case] = {
    "fused": Case("fused", {"B": 32, "M": 8, "L": 4096, "d": 64}, _flops, _arrayattn, _torch),
}

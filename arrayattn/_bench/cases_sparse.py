"""Benchmark cases of the Sparse Transformer attention.

``sparse_strided`` times :func:`arrayattn.sparse_attention` (strided, merged); its comparison is
``sparse_strided_dense``: arrayattn's own dense ``scaled_dot_product_attention`` with the mask
``sparse_attention_mask(...)`` on the same backend (run both with ``--no-torch`` and divide).
The ``torch`` runner of ``sparse_strided`` is PyTorch's SDPA with the same boolean mask.
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _pairs(p: dict) -> float:
    length, ell = p["L"], p["l"]
    i = np.arange(length)
    band = np.minimum(i + 1, ell + 1)  # local width l + 1
    strided = np.where(i >= 2 * ell, (i - 2 * ell) // ell + 1, 0)  # j = i - t·l, t >= 2
    return float(np.sum(band + strided))


def _flops(p: dict, mode: str) -> float:
    fwd = 4.0 * p["B"] * p["H"] * _pairs(p) * p["d"]
    return fwd if mode == "fwd" else 3.5 * fwd


def _dense_flops(p: dict, mode: str) -> float:
    fwd = 4.0 * p["B"] * p["H"] * p["L"] * p["L"] * p["d"]
    return fwd if mode == "fwd" else 3.5 * fwd


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    shape = (p["B"], p["H"], p["L"], p["d"])
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4)]


def _sparse(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _inputs(p, dtype)
    op = aa.sparse_attention
    kw = {"pattern": "strided", "stride": p["l"]}
    if mode == "fwd":
        return lambda: op(q, k, v, **kw)

    def run():
        out, res = op.fwd(q, k, v, **kw)
        return op.bwd(res, do)

    return run


def _dense(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _inputs(p, dtype)
    mask = aa.sparse_attention_mask(p["L"], pattern="strided", stride=p["l"])
    op = aa.scaled_dot_product_attention
    if mode == "fwd":
        return lambda: op(q, k, v, mask=mask)

    def run():
        out, res = op.fwd(q, k, v, mask=mask)
        return op.bwd(res, do)

    return run


def _torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    import arrayattn as aa

    q, k, v, do = (torch.from_numpy(a) for a in _inputs(p, dtype))
    mask = torch.from_numpy(aa.sparse_attention_mask(p["L"], pattern="strided", stride=p["l"]))
    return torch_runner(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), do, mode
    )


_SIZE = {"B": 1, "H": 1, "L": 8192, "l": 128, "d": 64}

CASES: dict[str, Case] = {
    "sparse_strided": Case("sparse_strided", dict(_SIZE), _flops, _sparse, _torch),
    "sparse_strided_dense": Case("sparse_strided_dense", dict(_SIZE), _dense_flops, _dense, None),
}

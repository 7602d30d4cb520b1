"""Benchmark cases of COSNet co-attention and CoDA (compositional de-attention).

PyTorch sides, with autograd:

* ``cosnet``: ``CoattentionModel.forward`` of the official code (carrierlxk/COSNet, the revision
  whose second softmax is of the raw affinities, ``second_softmax='paper'``) up to the gated
  outputs: a Linear on the exemplar, ``bmm`` affinities, two softmaxes, two ``bmm``, 1×1-conv
  sigmoid gates.
* ``coda``: the paper's equations (no official code is known): ``nn.functional.linear``
  projections, ``torch.cdist(p=1)`` for the L1 distances, ``tanh · sigmoid`` and two batched
  products.
"""

from __future__ import annotations

import numpy as np

from .case import Case, pair_op_runner, tensors, torch_runner

__all__ = ["CASES"]


def _coda_flops(p: dict, mode: str) -> float:
    n, la, lb, d, k = p["N"], p["La"], p["Lb"], p["d"], p["k"]
    proj = 2.0 * n * (la + lb) * d * 2 * k  # F_E and F_N of both sides
    pairs = n * la * lb * (2.0 * k + 3.0 * k + 2 * 2.0 * d)  # similarity, L1, A' = MB, B' = MᵀA
    fwd = proj + pairs
    return fwd if mode == "fwd" else 3.0 * fwd


def _coda_inputs(p: dict, dtype: str):
    from arrayattn._glue.co_attention import example_coda_params

    rng = np.random.default_rng(0)
    n, la, lb, d = p["N"], p["La"], p["Lb"], p["d"]

    def f(*shape: int) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)

    params = {key: v.astype(dtype) for key, v in example_coda_params(rng, d, p["k"]).items()}
    # ‖F_N(a_i) − F_N(b_j)‖₁ grows like k; β ~ 1/k keeps N = −β·dist of order 1. With β ~ 0.5 and
    # k = 150, σ(N) ≈ e^(−85) would be subnormal in float32 for a fifth of the pairs, and
    # subnormal arithmetic, not the op, would dominate both sides' times.
    params["beta"] = np.full(1, 1.0 / p["k"], dtype)
    return f(n, la, d), f(n, lb, d), params, f(n, la, d), f(n, lb, d)


def _coda_torch(p: dict, dtype: str, mode: str):
    import torch
    from torch.nn.functional import linear

    a, b, params, da, db = tensors(_coda_inputs(p, dtype))

    def forward():
        fa, fb = linear(a, params["w_e"], params["b_e"]), linear(b, params["w_e"], params["b_e"])
        ga, gb = linear(a, params["w_n"]), linear(b, params["w_n"])
        e = params["alpha"] * torch.bmm(fa, fb.transpose(1, 2))
        nn = -params["beta"] * torch.cdist(ga, gb, p=1)
        m = torch.tanh(e) * torch.sigmoid(nn)
        return torch.bmm(m, b), torch.bmm(m.transpose(1, 2), a)

    return torch_runner(forward, [a, b, *params.values()], (da, db), mode)


def _cosnet_flops(p: dict, mode: str) -> float:
    n, c, pos = p["N"], p["C"], p["H"] * p["W"]
    fwd = 2.0 * n * pos * c * c + 3 * 2.0 * n * pos * pos * c + 2 * 2.0 * n * pos * c
    return fwd if mode == "fwd" else 3.0 * fwd


def _cosnet_inputs(p: dict, dtype: str):
    from arrayattn._glue.co_attention import example_coattn_params

    rng = np.random.default_rng(0)
    shape = (p["N"], p["C"], p["H"], p["W"])
    f = lambda: rng.standard_normal(shape, dtype=np.float32).astype(dtype)  # noqa: E731
    params = {key: v.astype(dtype) for key, v in example_coattn_params(rng, p["C"]).items()}
    return f(), f(), params, f(), f()


def _cosnet_torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    a, b, params, da, db = tensors(_cosnet_inputs(p, dtype))
    n, c, h, w = a.shape

    def forward():
        exemplar_flat, query_flat = a.view(n, c, h * w), b.view(n, c, h * w)
        affinity = torch.bmm(F.linear(exemplar_flat.transpose(1, 2), params["w"]), query_flat)
        query_att = torch.bmm(exemplar_flat, F.softmax(affinity, dim=1)).view(n, c, h, w)
        exemplar_att = torch.bmm(query_flat, F.softmax(affinity.transpose(1, 2), dim=1)).view(
            n, c, h, w
        )
        gate = lambda x: x * torch.sigmoid(F.conv2d(x, params["w_gate"]))  # noqa: E731
        return gate(exemplar_att), gate(query_att)

    return torch_runner(forward, [a, b, *params.values()], (da, db), mode)


CASES: dict[str, Case] = {
    "cosnet": Case(
        "cosnet",
        {"N": 2, "C": 256, "H": 32, "W": 32},
        _cosnet_flops,
        pair_op_runner("co_attention", _cosnet_inputs),
        _cosnet_torch,
    ),
    "coda": Case(
        "coda",
        {"N": 8, "La": 128, "Lb": 128, "d": 300, "k": 150},
        _coda_flops,
        pair_op_runner("coda", _coda_inputs),
        _coda_torch,
    ),
}

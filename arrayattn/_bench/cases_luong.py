"""Benchmark cases of Bahdanau (additive) and Luong local-p attention.

The PyTorch side is a straightforward OpenNMT-py-style implementation (``GlobalAttention`` with
``attn_type='mlp'``; local-p as dense scores, a window mask, softmax and the Gaussian), run with
autograd.
"""

from __future__ import annotations

import numpy as np

from .case import Case, pair_op_runner, tensors, torch_runner

__all__ = ["CASES"]


def _rng():
    return np.random.default_rng(0)


# -- Bahdanau additive attention ------------------------------------------------------------------


def _bahdanau_flops(p: dict, mode: str) -> float:
    n, t, s, d, da = p["N"], p["T"], p["S"], p["d"], p["da"]
    proj = 2.0 * n * (t + s) * d * da
    scores = 3.0 * n * t * s * da  # add, tanh, multiply-add by v (tanh counted as one)
    context = 2.0 * n * t * s * d
    fwd = proj + scores + context
    return fwd if mode == "fwd" else fwd + 2 * proj + 3 * scores + 2 * context


def _bahdanau_inputs(p: dict, dtype: str):
    rng = _rng()
    n, t, s, d, da = p["N"], p["T"], p["S"], p["d"], p["da"]

    def f(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    params = {"w_a": f(da, d) / d**0.5, "u_a": f(da, d) / d**0.5, "v_a": f(da), "b_a": f(da)}
    return f(n, t, d), f(n, s, d), params, f(n, t, d), f(n, t, s)


def _bahdanau_torch(p: dict, dtype: str, mode: str):
    import torch

    s_prev, h, params, dc, da = tensors(_bahdanau_inputs(p, dtype))

    def forward():  # OpenNMT-py GlobalAttention.score, attn_type='mlp'
        wq = torch.nn.functional.linear(s_prev, params["w_a"], params["b_a"])
        uh = torch.nn.functional.linear(h, params["u_a"])
        e = torch.tanh(wq.unsqueeze(2) + uh.unsqueeze(1)) @ params["v_a"]
        align = torch.softmax(e, -1)
        return torch.bmm(align, h), align

    return torch_runner(forward, [s_prev, h, *params.values()], (dc, da), mode)


# -- Luong local-p attention ----------------------------------------------------------------------


def _local_flops(p: dict, mode: str) -> float:
    n, t, d, w = p["N"], p["T"], p["d"], 2 * p["D"] + 1
    fwd = 2.0 * n * t * d * d + 2.0 * n * t * d * p["dp"] + 4.0 * n * t * w * d
    return fwd if mode == "fwd" else 3.0 * fwd


def _local_inputs(p: dict, dtype: str):
    rng = _rng()
    n, t, s, d, dp = p["N"], p["T"], p["S"], p["d"], p["dp"]

    def f(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    params = {"w_a": f(d, d) / d**0.5, "w_p": f(dp, d) / d**0.5, "v_p": f(dp)}
    return f(n, t, d), f(n, s, d), params, f(n, t, d), f(n, t, s)


def _local_torch(p: dict, dtype: str, mode: str):
    import torch

    h_t, h_s, params, dc, da = tensors(_local_inputs(p, dtype))
    radius, s_len = p["D"], p["S"]
    positions = torch.arange(s_len, dtype=h_t.dtype)

    def forward():  # dense scores, window mask, softmax, Gaussian (paper formulas)
        pt = s_len * torch.sigmoid(torch.tanh(h_t @ params["w_p"].T) @ params["v_p"])
        centre = torch.floor(pt).detach()
        keep = (positions - centre[..., None]).abs() <= radius
        z = torch.bmm(h_t @ params["w_a"].T, h_s.transpose(1, 2)).masked_fill(~keep, -float("inf"))
        gauss = torch.exp(-((positions - pt[..., None]) ** 2) / (2 * (radius / 2) ** 2))
        a = torch.softmax(z, -1) * gauss
        return torch.bmm(a, h_s), a

    return torch_runner(forward, [h_t, h_s, *params.values()], (dc, da), mode)


CASES: dict[str, Case] = {
    "bahdanau": Case(
        "bahdanau",
        {"N": 16, "T": 32, "S": 64, "d": 256, "da": 128},
        _bahdanau_flops,
        pair_op_runner("bahdanau_attention", _bahdanau_inputs),
        _bahdanau_torch,
    ),
    "luong_local_p": Case(
        "luong_local_p",
        {"N": 16, "T": 64, "S": 256, "d": 256, "dp": 128, "D": 10},
        _local_flops,
        pair_op_runner(
            "local_attention",
            _local_inputs,
            lambda p: {"window": p["D"], "mode": "predictive", "score": "general"},
        ),
        _local_torch,
    ),
}

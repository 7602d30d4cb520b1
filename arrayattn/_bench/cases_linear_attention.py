"""Benchmark cases of efficient attention and linear attention (linear in the length n).

Vary ``L`` (``--size L=1024`` ... ``L=65536``) to see the linear growth. The PyTorch runners are
straightforward re-implementations of the same formulas (the official repositories' forms:
``cmsflash/efficient-attention`` for efficient attention, ``fast-transformers``' non-causal
linear attention and a cumulative-sum causal form).
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _flops(p: dict, mode: str) -> float:
    fwd = 4.0 * p["B"] * p["H"] * p["L"] * p["d"] * p["d"]  # context k̃ᵀv and q̃·context
    if p.get("causal"):
        fwd *= 1.0 + 128 / (2 * p["d"])  # chunked: the in-chunk (C × C) products as well
    return fwd if mode == "fwd" else 3.0 * fwd


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    shape = (p["B"], p["H"], p["L"], p["d"])
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4)]


def _aa_runner(op_name, **kw):
    def make(p: dict, dtype: str, mode: str):
        import arrayattn as aa

        q, k, v, do = _inputs(p, dtype)
        op = getattr(aa, op_name)
        extra = {k_: bool(p.get(k_)) for k_ in kw}
        if mode == "fwd":
            return lambda: op(q, k, v, **extra)

        def run():
            out, res = op.fwd(q, k, v, **extra)
            return op.bwd(res, do)

        return run

    return make


def _torch_runner(fn):
    def make(p: dict, dtype: str, mode: str):
        import torch

        q, k, v, do = (torch.from_numpy(a) for a in _inputs(p, dtype))
        causal = bool(p.get("causal"))
        return torch_runner(lambda: fn(q, k, v, causal), (q, k, v), do, mode)

    return make


def _torch_efficient(q, k, v, causal):
    import torch

    return torch.softmax(q, dim=-1) @ (torch.softmax(k, dim=-2).transpose(-1, -2) @ v)


def _torch_linear(q, k, v, causal, eps=1e-6):
    import torch
    import torch.nn.functional as F

    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    if not causal:
        s = fk.transpose(-1, -2) @ v
        return (fq @ s) / (fq @ fk.sum(-2).unsqueeze(-1) + eps)
    # materialises every prefix state S_i (L × d × dv): the straightforward PyTorch form
    s = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)
    z = torch.cumsum(fk, dim=-2)
    return torch.einsum("...ld,...ldm->...lm", fq, s) / ((fq * z).sum(-1, keepdim=True) + eps)


_SIZE = {"B": 1, "H": 4, "L": 8192, "d": 64}

CASES: dict[str, Case] = {
    "efficient_attention": Case(
        "efficient_attention",
        dict(_SIZE),
        _flops,
        _aa_runner("efficient_attention"),
        _torch_runner(_torch_efficient),
    ),
    "linear_attention": Case(
        "linear_attention",
        {**_SIZE, "causal": 0},
        _flops,
        _aa_runner("linear_attention", causal=0),
        _torch_runner(_torch_linear),
    ),
}

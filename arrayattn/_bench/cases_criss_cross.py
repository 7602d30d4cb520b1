"""Benchmark cases of criss-cross attention (CCNet).

The PyTorch side is CCNet's pure-PyTorch formulation (``speedinghzl/CCNet`` master,
``CrissCrossAttention`` from ``Serge-weihao/CCNet-Pure-Pytorch``): per-column and per-row batched
matmuls on NCHW maps, a ``-inf`` diagonal on the column energies, one softmax over the
concatenated ``H + W`` energies, and two batched matmuls with the values. Only the attention core
is timed (no 1×1 convolutions, no gamma/residual), forward or forward+backward for q, k, v.
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES", "ccnet_torch_attention"]


def _flops(p: dict, mode: str) -> float:
    # logits (H+W-1 keys, dk) and aggregation (dv) per pixel, 2 flops per multiply-add;
    # backward: dp (dv), dq and dk (dk), dv (dv) -> about twice the forward.
    pixels = p["B"] * p["H"] * p["W"]
    keys = p["H"] + p["W"] - 1
    fwd = 2.0 * pixels * keys * (p["dk"] + p["dv"])
    return fwd if mode == "fwd" else 3.0 * fwd


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    b, h, w = p["B"], p["H"], p["W"]
    q = rng.standard_normal((b, h, w, p["dk"]), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((b, h, w, p["dk"]), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((b, h, w, p["dv"]), dtype=np.float32).astype(dtype)
    do = rng.standard_normal((b, h, w, p["dv"]), dtype=np.float32).astype(dtype)
    return q, k, v, do


def _arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _inputs(p, dtype)
    op = aa.criss_cross_attention
    if mode == "fwd":
        return lambda: op(q, k, v)

    def run():
        out, res = op.fwd(q, k, v)
        return op.bwd(res, do)

    return run


def ccnet_torch_attention(q, k, v):
    """CCNet's pure-PyTorch criss-cross core on NCHW tensors: q, k (B, dk, H, W), v (B, dv, H,
    W)."""
    import torch

    b, _, h, w = q.shape
    q_h = q.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h).permute(0, 2, 1)
    q_w = q.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w).permute(0, 2, 1)
    k_h = k.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
    k_w = k.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
    v_h = v.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
    v_w = v.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
    inf = -torch.diag(torch.tensor(float("inf"), dtype=q.dtype).repeat(h), 0).unsqueeze(0)
    energy_h = (torch.bmm(q_h, k_h) + inf.repeat(b * w, 1, 1)).view(b, w, h, h).permute(0, 2, 1, 3)
    energy_w = torch.bmm(q_w, k_w).view(b, h, w, w)
    concate = torch.softmax(torch.cat([energy_h, energy_w], 3), dim=3)
    att_h = concate[:, :, :, 0:h].permute(0, 2, 1, 3).contiguous().view(b * w, h, h)
    att_w = concate[:, :, :, h : h + w].contiguous().view(b * h, w, w)
    out_h = torch.bmm(v_h, att_h.permute(0, 2, 1)).view(b, w, -1, h).permute(0, 2, 3, 1)
    out_w = torch.bmm(v_w, att_w.permute(0, 2, 1)).view(b, h, -1, w).permute(0, 2, 1, 3)
    return out_h + out_w


def _torch(p: dict, dtype: str, mode: str):
    import torch

    q, k, v, do = (
        torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in _inputs(p, dtype)
    )
    return torch_runner(lambda: ccnet_torch_attention(q, k, v), (q, k, v), do, mode)


CASES: dict[str, Case] = {
    "criss_cross": Case(
        "criss_cross",
        {"B": 2, "H": 64, "W": 64, "dk": 8, "dv": 64},
        _flops,
        _arrayattn,
        _torch,
    ),
}

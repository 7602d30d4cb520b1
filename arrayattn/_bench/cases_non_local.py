"""Benchmark cases of the non-local block (embedded Gaussian, 2×2 subsampling).

The PyTorch side is AlexHex7's ``_NonLocalBlockND`` semantics (1×1 convs with bias, softmax of the
unscaled θᵀφ, max-pooled φ and g, ``W`` conv, residual; BN omitted) with the same weights, run
forward (no_grad) or forward + ``autograd.grad`` for x and every parameter.
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    n, c, h, w, ci = p["N"], p["C"], p["H"], p["W"], p["C"] // 2
    x = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    params = {}
    for key, shape in (("theta", (ci, c)), ("phi", (ci, c)), ("g", (ci, c)), ("z", (c, ci))):
        params[f"w_{key}"] = (rng.standard_normal(shape + (1, 1)) / np.sqrt(shape[1])).astype(dtype)
        params[f"b_{key}"] = (0.1 * rng.standard_normal(shape[0])).astype(dtype)
    return x, params, dy


def _flops(p: dict, mode: str) -> float:
    n, c, hw = p["N"], p["C"], p["H"] * p["W"]
    ci, hw2 = c // 2, (p["H"] // 2) * (p["W"] // 2)
    proj = 2.0 * n * hw * c * ci * 4  # θ, φ, g, W_z
    attn = 4.0 * n * hw * hw2 * ci  # θᵀφ and P g
    return proj + attn if mode == "fwd" else 3.0 * proj + 2.5 * attn


def _arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    x, params, dy = _inputs(p, dtype)
    if mode == "fwd":
        return lambda: aa.non_local_block(x, params, subsample=True)

    def run():
        _, res = aa.non_local_block.fwd(x, params, subsample=True)
        return aa.non_local_block.bwd(res, dy)

    return run


def _torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    x, params, dy = _inputs(p, dtype)
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    b, ci = x.shape[0], params["w_g"].shape[0]

    def block(xx):
        g = F.max_pool2d(F.conv2d(xx, t["w_g"], t["b_g"]), 2).view(b, ci, -1).permute(0, 2, 1)
        th = F.conv2d(xx, t["w_theta"], t["b_theta"]).view(b, ci, -1).permute(0, 2, 1)
        ph = F.max_pool2d(F.conv2d(xx, t["w_phi"], t["b_phi"]), 2).view(b, ci, -1)
        y = (
            torch.matmul(F.softmax(torch.matmul(th, ph), dim=-1), g)
            .permute(0, 2, 1)
            .reshape(b, ci, *xx.shape[2:])
        )
        return F.conv2d(y, t["w_z"], t["b_z"]) + xx

    return torch_runner(lambda: block(xt), [xt, *t.values()], dyt, mode)


CASES: dict[str, Case] = {
    "non_local_block": Case(
        "non_local_block", {"N": 4, "C": 256, "H": 32, "W": 32}, _flops, _arrayattn, _torch
    ),
}

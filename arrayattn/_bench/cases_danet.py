"""Benchmark cases of DANet's position and channel attention modules.

The PyTorch side is ``junfu1115/DANet``'s ``PAM_Module`` / ``CAM_Module`` forward (dense N×N
energy for PAM, ``rowmax − energy`` for CAM) with the same weights, run forward (no_grad) or
forward + ``autograd.grad`` for x and every parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    n, c, h, w = p["N"], p["C"], p["H"], p["W"]
    cq = max(1, c // 8)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    params = {
        "w_query": (rng.standard_normal((cq, c, 1, 1)) / np.sqrt(c)).astype(dtype),
        "b_query": (0.1 * rng.standard_normal(cq)).astype(dtype),
        "w_key": (rng.standard_normal((cq, c, 1, 1)) / np.sqrt(c)).astype(dtype),
        "b_key": (0.1 * rng.standard_normal(cq)).astype(dtype),
        "w_value": (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(dtype),
        "b_value": (0.1 * rng.standard_normal(c)).astype(dtype),
        "gamma": np.array([0.5], dtype=dtype),
    }
    return x, params, dy


def _pam_flops(p: dict, mode: str) -> float:
    n, c, hw = p["N"], p["C"], p["H"] * p["W"]
    proj = 2.0 * n * hw * c * (c + c // 4)
    attn = 2.0 * n * hw * hw * (c // 8 + c)
    return proj + attn if mode == "fwd" else 3.0 * proj + 2.5 * attn


def _cam_flops(p: dict, mode: str) -> float:
    n, c, hw = p["N"], p["C"], p["H"] * p["W"]
    attn = 4.0 * n * c * c * hw
    return attn if mode == "fwd" else 2.5 * attn


def _arrayattn(name: str):
    def runner(p: dict, dtype: str, mode: str):
        import arrayattn as aa

        x, params, dy = _inputs(p, dtype)
        op: Any
        if name == "pam":
            op, args, kw = aa.position_attention, (x, params), {}
        else:
            op, args, kw = aa.channel_attention, (x, params["gamma"]), {"logits": "code"}
        if mode == "fwd":
            return lambda: op(*args, **kw)

        def run():
            _, res = op.fwd(*args, **kw)
            return op.bwd(res, dy)

        return run

    return runner


def _torch(name: str):
    def runner(p: dict, dtype: str, mode: str):
        import torch
        import torch.nn.functional as F

        x, params, dy = _inputs(p, dtype)
        t = {k: torch.from_numpy(v) for k, v in params.items()}
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

        def pam(xx):
            b, c, h, w = xx.shape
            q = F.conv2d(xx, t["w_query"], t["b_query"]).view(b, -1, h * w).permute(0, 2, 1)
            k = F.conv2d(xx, t["w_key"], t["b_key"]).view(b, -1, h * w)
            att = F.softmax(torch.bmm(q, k), dim=-1)
            v = F.conv2d(xx, t["w_value"], t["b_value"]).view(b, -1, h * w)
            return t["gamma"] * torch.bmm(v, att.permute(0, 2, 1)).view(b, c, h, w) + xx

        def cam(xx):
            b, c, h, w = xx.shape
            a = xx.view(b, c, -1)
            energy = torch.bmm(a, a.permute(0, 2, 1))
            energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
            return t["gamma"] * torch.bmm(F.softmax(energy, dim=-1), a).view(b, c, h, w) + xx

        block = pam if name == "pam" else cam
        used = t if name == "pam" else {"gamma": t["gamma"]}
        return torch_runner(lambda: block(xt), [xt, *used.values()], dyt, mode)

    return runner


_SIZE = {"N": 4, "C": 256, "H": 32, "W": 32}

CASES: dict[str, Case] = {
    "position_attention": Case(
        "position_attention", dict(_SIZE), _pam_flops, _arrayattn("pam"), _torch("pam")
    ),
    "channel_attention": Case(
        "channel_attention", dict(_SIZE), _cam_flops, _arrayattn("cam"), _torch("cam")
    ),
}

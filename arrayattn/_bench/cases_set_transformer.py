"""Benchmark cases of the Set Transformer blocks (official-code variant, compared with a PyTorch
re-implementation of ``juho-lee/set_transformer`` ``modules.py`` holding the same weights)."""

from __future__ import annotations

import math

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _code_params(rng, dq, dk, dv, prefix, dtype):
    shapes = {
        "w_q": (dv, dq),
        "w_k": (dv, dk),
        "w_v": (dv, dk),
        "w_ff": (dv, dv),
        "b_q": (dv,),
        "b_k": (dv,),
        "b_v": (dv,),
        "b_ff": (dv,),
    }
    return {
        prefix + k: (rng.standard_normal(s) / math.sqrt(s[-1])).astype(dtype)
        for k, s in shapes.items()
    }


def _isab_inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    d, m = p["d"], p["m"]
    params = {"I": rng.standard_normal((m, d)).astype(dtype)}
    params.update(_code_params(rng, d, d, d, "mab0.", dtype))
    params.update(_code_params(rng, d, d, d, "mab1.", dtype))
    x = rng.standard_normal((p["N"], p["n"], d)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    return x, params, dy


def _isab_flops(p: dict, mode: str) -> float:
    n, s, d, m = p["N"], p["n"], p["d"], p["m"]
    # per MAB: 4 projections (q, k, v, fc_o) and two attention matmuls over n·m pairs
    proj = 2.0 * d * d * (m + 2 * s + m + s + 2 * m + s)
    attn = 2 * 4.0 * s * m * d
    fwd = n * (proj + attn)
    return fwd if mode == "fwd" else 3.0 * fwd


def _isab_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    x, params, dy = _isab_inputs(p, dtype)
    kw = {"num_heads": p["heads"], "variant": "code"}
    if mode == "fwd":
        return lambda: aa.isab(x, params, **kw)

    def run():
        out, res = aa.isab.fwd(x, params, **kw)
        return aa.isab.bwd(res, dy)

    return run


def _isab_torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    x, params, dy = _isab_inputs(p, dtype)
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    heads = p["heads"]

    def mab(q_in, k_in, pre):
        q = F.linear(q_in, t[pre + "w_q"], t[pre + "b_q"])
        k, v = (
            F.linear(k_in, t[pre + "w_k"], t[pre + "b_k"]),
            F.linear(k_in, t[pre + "w_v"], t[pre + "b_v"]),
        )
        split = q.shape[-1] // heads
        q_, k_, v_ = (torch.cat(z.split(split, 2), 0) for z in (q, k, v))
        a = torch.softmax(q_.bmm(k_.transpose(1, 2)) / math.sqrt(q.shape[-1]), 2)
        o = torch.cat((q_ + a.bmm(v_)).split(q.size(0), 0), 2)
        return o + F.relu(F.linear(o, t[pre + "w_ff"], t[pre + "b_ff"]))

    def forward():
        h = mab(t["I"][None].repeat(xt.size(0), 1, 1), xt, "mab0.")
        return mab(xt, h, "mab1.")

    return torch_runner(forward, [xt, *t.values()], dyt, mode)


CASES: dict[str, Case] = {
    "isab": Case(
        "isab",
        {"N": 16, "n": 1024, "d": 128, "m": 32, "heads": 4},
        _isab_flops,
        _isab_arrayattn,
        _isab_torch,
    ),
}

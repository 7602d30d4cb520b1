"""Benchmark cases of scaled dot-product and multi-head attention."""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _rng():
    return np.random.default_rng(0)


# -- scaled dot-product attention -----------------------------------------------------------------


def _sdpa_flops(p: dict, mode: str) -> float:
    # FlashAttention's convention: 4·B·H·Lq·Lk·d forward (two matmuls), backward 2.5x forward;
    # causal attention does half the work.
    fwd = 4.0 * p["B"] * p["H"] * p["L"] * p["L"] * p["d"]
    if p.get("causal"):
        fwd /= 2
    return fwd if mode == "fwd" else 3.5 * fwd


def _sdpa_inputs(p: dict, dtype: str):
    rng = _rng()
    shape = (p["B"], p["H"], p["L"], p["d"])
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4)]


def _sdpa_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _sdpa_inputs(p, dtype)
    causal = bool(p.get("causal"))
    op = aa.scaled_dot_product_attention
    if mode == "fwd":
        return lambda: op(q, k, v, causal=causal)

    def run():
        out, res = op.fwd(q, k, v, causal=causal)
        return op.bwd(res, do)

    return run


def _sdpa_torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    q, k, v, do = (torch.from_numpy(a) for a in _sdpa_inputs(p, dtype))
    causal = bool(p.get("causal"))
    return torch_runner(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), do, mode
    )


# -- multi-head attention -----------------------------------------------------------------------


def _mha_flops(p: dict, mode: str) -> float:
    n, length, e = p["N"], p["L"], p["E"]
    proj = 2.0 * n * length * e * e * 4  # q, k, v and output projections
    attn = 4.0 * n * length * length * e
    fwd = proj + attn
    return fwd if mode == "fwd" else 3.0 * proj + 3.5 * attn


def _mha_inputs(p: dict, dtype: str):
    rng = _rng()
    e = p["E"]
    x = rng.standard_normal((p["N"], p["L"], e), dtype=np.float32).astype(dtype)
    params = {f"w_{n}": (rng.standard_normal((e, e)) / np.sqrt(e)).astype(dtype) for n in "qkvo"}
    params.update({f"b_{n}": np.zeros(e, dtype) for n in "qkvo"})
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(dtype)
    return x, params, dy


def _mha_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    x, params, dy = _mha_inputs(p, dtype)
    op = aa.multi_head_attention
    if mode == "fwd":
        return lambda: op(x, x, params, num_heads=p["heads"])

    def run():
        y, res = op.fwd(x, x, params, num_heads=p["heads"])
        return op.bwd(res, dy)

    return run


def _mha_torch(p: dict, dtype: str, mode: str):
    import torch

    x, params, dy = _mha_inputs(p, dtype)
    e = p["E"]
    m = torch.nn.MultiheadAttention(e, p["heads"], batch_first=True, dtype=getattr(torch, dtype))
    with torch.no_grad():
        m.in_proj_weight.copy_(
            torch.from_numpy(np.concatenate([params["w_q"], params["w_k"], params["w_v"]]))
        )
        m.out_proj.weight.copy_(torch.from_numpy(params["w_o"]))
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    return torch_runner(
        lambda: m(xt, xt, xt, need_weights=False)[0], [xt, *m.parameters()], dyt, mode
    )


CASES: dict[str, Case] = {
    "sdpa": Case(
        "sdpa",
        {"B": 1, "H": 8, "L": 2048, "d": 64, "causal": 0},
        _sdpa_flops,
        _sdpa_arrayattn,
        _sdpa_torch,
    ),
    "mha": Case(
        "mha",
        {"N": 4, "L": 512, "E": 256, "heads": 8},
        _mha_flops,
        _mha_arrayattn,
        _mha_torch,
    ),
}

"""Glue of the Set Transformer blocks: options, residual schemas, reference kernels, examples.

All four blocks are composite: MAB runs its attention through the ``multi_head_attention`` op
(``variant='paper'``) or the ``scaled_dot_product_attention`` op (``'code'``), and SAB, ISAB and
PMA run MAB through the ``mab`` op, each on whichever backend the setting picks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.primitives import linear_backward, linear_forward
from .._reference.set_transformer import (
    merge_heads,
    norm_backward,
    norm_forward,
    rff_backward,
    rff_forward,
    split_heads,
)

__all__ = [
    "ISAB_REFERENCE",
    "ISAB_RESIDUALS",
    "MAB_REFERENCE",
    "MAB_RESIDUALS",
    "MHA_KEYS",
    "PMA_REFERENCE",
    "PMA_RESIDUALS",
    "SAB_REFERENCE",
    "SAB_RESIDUALS",
    "SetOptions",
    "sub_params",
]


@dataclass(frozen=True)
class SetOptions(Options):
    num_heads: int
    variant: str  # "paper" or "code"
    ln: bool
    eps: float


MHA_KEYS = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
MAB_RESIDUALS = ("mha?", "sdpa?", "x?", "y?", "ln0.*", "rff.*", "ln1.*", "p.*")
SAB_RESIDUALS = ("mab",)
ISAB_RESIDUALS = ("mab0", "mab1")
PMA_RESIDUALS = ("mab", "pre.*", "p.*")


def sub_params(params: dict, prefix: str) -> dict:
    """The entries of ``params`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _prefixed(prefix, d):
    return {prefix + k: v for k, v in d.items()}


def _mab_fwd(xp, arrays, options, save, *, ops):
    p = arrays["params"]
    x, y = arrays["x"], arrays["y"]
    heads, ln, eps = options.num_heads, options.ln, options.eps
    saved = {}
    if options.variant == "paper":
        mha_p = {k: p[k] for k in MHA_KEYS if k in p}
        if save:
            att, saved["mha"] = ops.multi_head_attention.fwd(x, y, mha_p, num_heads=heads)
        else:
            att = ops.multi_head_attention(x, y, mha_p, num_heads=heads)
        h0 = x + att
    else:
        qp = linear_forward(xp, x, p["w_q"], p.get("b_q"))
        kp = linear_forward(xp, y, p["w_k"], p.get("b_k"))
        vp = linear_forward(xp, y, p["w_v"], p.get("b_v"))
        scale = 1.0 / math.sqrt(qp.shape[-1])  # the full width dim_V, as the official code
        qh, kh, vh = (split_heads(xp, t, heads) for t in (qp, kp, vp))
        if save:
            att, saved["sdpa"] = ops.scaled_dot_product_attention.fwd(qh, kh, vh, scale=scale)
            saved.update(x=x, y=y)
        else:
            att = ops.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        h0 = qp + merge_heads(xp, att)
    h, s0 = norm_forward(xp, h0, p, "ln0", ln, eps)
    f, sf = rff_forward(xp, h, p)
    out, s1 = norm_forward(xp, h + f, p, "ln1", ln, eps)
    if save:
        saved.update({**_prefixed("ln0.", s0), **_prefixed("rff.", sf), **_prefixed("ln1.", s1)})
        saved.update({f"p.{k}": v for k, v in p.items()})
    return (out,), saved


def _mab_bwd(xp, saved, options, cotangents, *, ops):
    (dout,) = cotangents
    p = sub_params(saved, "p.")
    ln = options.ln
    dtype = dout.dtype
    grads = {}
    do0, g = norm_backward(xp, sub_params(saved, "ln1."), p, "ln1", ln, dout)
    grads.update(g)
    dh, g = rff_backward(xp, sub_params(saved, "rff."), p, do0)
    grads.update(g)
    dh = dh + do0
    dh0, g = norm_backward(xp, sub_params(saved, "ln0."), p, "ln0", ln, dh)
    grads.update(g)
    if options.variant == "paper":
        gm = ops.multi_head_attention.bwd(saved["mha"], dh0)
        dx = dh0 + gm.x_q
        dy = gm.x_kv
        grads.update(gm.params)
    else:
        heads = options.num_heads
        gs = ops.scaled_dot_product_attention.bwd(saved["sdpa"], split_heads(xp, dh0, heads))
        dqp = dh0 + merge_heads(xp, gs.q)
        x, y = saved["x"], saved["y"]
        dx, grads["w_q"], db = linear_backward(xp, x, p["w_q"], dqp, "b_q" in p)
        if db is not None:
            grads["b_q"] = db
        dy, grads["w_k"], db = linear_backward(xp, y, p["w_k"], merge_heads(xp, gs.k), "b_k" in p)
        if db is not None:
            grads["b_k"] = db
        dyv, grads["w_v"], db = linear_backward(xp, y, p["w_v"], merge_heads(xp, gs.v), "b_v" in p)
        if db is not None:
            grads["b_v"] = db
        dy = dy + dyv
    return {
        "x": xp.astype(dx, dtype),
        "y": xp.astype(dy, dtype),
        "params": {k: xp.astype(v, dtype) for k, v in grads.items()},
    }


def _opts(options):
    return {
        "num_heads": options.num_heads,
        "variant": options.variant,
        "ln": options.ln,
        "eps": options.eps,
    }


def _sab_fwd(xp, arrays, options, save, *, ops):
    x, p = arrays["x"], arrays["params"]
    if save:
        out, res = ops.mab.fwd(x, x, p, **_opts(options))
        return (out,), {"mab": res}
    return (ops.mab(x, x, p, **_opts(options)),), {}


def _sab_bwd(xp, saved, options, cotangents, *, ops):
    g = ops.mab.bwd(saved["mab"], cotangents[0])
    return {"x": g.x + g.y, "params": g.params}


def _batch(xp, s, n):
    """Learned points (k, d) repeated over the batch: (N, k, d) (a broadcast, never written)."""
    return xp.broadcast_to(s[None, ...], (n,) + tuple(s.shape))


def _isab_fwd(xp, arrays, options, save, *, ops):
    x, p = arrays["x"], arrays["params"]
    ind = _batch(xp, p["I"], x.shape[0])
    if save:
        h, r0 = ops.mab.fwd(ind, x, sub_params(p, "mab0."), **_opts(options))
        out, r1 = ops.mab.fwd(x, h, sub_params(p, "mab1."), **_opts(options))
        return (out,), {"mab0": r0, "mab1": r1}
    h = ops.mab(ind, x, sub_params(p, "mab0."), **_opts(options))
    return (ops.mab(x, h, sub_params(p, "mab1."), **_opts(options)),), {}


def _isab_bwd(xp, saved, options, cotangents, *, ops):
    g1 = ops.mab.bwd(saved["mab1"], cotangents[0])
    g0 = ops.mab.bwd(saved["mab0"], g1.y)
    params = {"I": xp.sum(g0.x, axis=0)}
    params.update(_prefixed("mab0.", g0.params))
    params.update(_prefixed("mab1.", g1.params))
    return {"x": g1.x + g0.y, "params": params}


def _pma_fwd(xp, arrays, options, save, *, ops):
    z, p = arrays["z"], arrays["params"]
    seeds = _batch(xp, p["S"], z.shape[0])
    saved = {}
    if "rff.w_ff" in p:
        zz, sf = rff_forward(xp, z, p, "rff.")
        if save:
            saved.update(_prefixed("pre.", sf))
            saved.update({f"p.{k}": v for k, v in p.items() if k.startswith("rff.")})
    else:
        zz = z
    if save:
        out, saved["mab"] = ops.mab.fwd(seeds, zz, sub_params(p, "mab."), **_opts(options))
        return (out,), saved
    return (ops.mab(seeds, zz, sub_params(p, "mab."), **_opts(options)),), saved


def _pma_bwd(xp, saved, options, cotangents, *, ops):
    g = ops.mab.bwd(saved["mab"], cotangents[0])
    params = {"S": xp.sum(g.x, axis=0), **_prefixed("mab.", g.params)}
    dz = g.y
    p = sub_params(saved, "p.")
    if p:
        dz, gr = rff_backward(xp, sub_params(saved, "pre."), p, dz, "rff.")
        params.update(gr)
    return {"z": dz, "params": params}


MAB_REFERENCE = Kernel(
    _mab_fwd, _mab_bwd, dtypes=None, uses=("multi_head_attention", "scaled_dot_product_attention")
)
SAB_REFERENCE = Kernel(_sab_fwd, _sab_bwd, dtypes=None, uses=("mab",))
ISAB_REFERENCE = Kernel(_isab_fwd, _isab_bwd, dtypes=None, uses=("mab",))
PMA_REFERENCE = Kernel(_pma_fwd, _pma_bwd, dtypes=None, uses=("mab",))

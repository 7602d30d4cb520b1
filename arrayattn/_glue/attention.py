"""Glue of the attention family: options, residual schemas, reference kernels, the SDPA convention.

Scaled dot-product attention kernels are written in a narrower convention than the op protocol
(every backend implements the same pair)::

    forward(q, k, v, *, mask, bias, causal, scale, gqa_groups) -> (out, lse)
    backward(q, k, v, out, lse, dout, dlse, *, mask, bias, causal, scale, gqa_groups)
        -> (dq, dk, dv, dbias)

``dlse`` is ``None`` when the logsumexp is not an output. :func:`sdpa_adapter` turns such a pair
into the op protocol. Multi-head attention is composite: its reference projects with array-API
products and runs the attention core through the ``scaled_dot_product_attention`` op, on
whichever backend the setting picks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._kernel import Kernel, Options
from .._reference.attention import sdpa_backward, sdpa_forward
from .._xp import compute_dtype, flat_rows

__all__ = [
    "MHA_REFERENCE",
    "MHA_RESIDUALS",
    "SDPA_REFERENCE",
    "SDPA_RESIDUALS",
    "MhaOptions",
    "SdpaOptions",
    "sdpa_adapter",
]


# -- scaled dot-product attention ---------------------------------------------------------------


@dataclass(frozen=True)
class SdpaOptions(Options):
    scale: float
    causal: str | None  # None, "top_left" or "bottom_right"
    gqa_groups: int
    return_lse: bool


SDPA_RESIDUALS = ("q", "k", "v", "mask", "bias", "out", "lse")


def _sdpa_kwargs(options: SdpaOptions) -> dict[str, Any]:
    return {"causal": options.causal, "scale": options.scale, "gqa_groups": options.gqa_groups}


def sdpa_adapter(kernel: Kernel, *, takes_xp: bool = False) -> Kernel:
    """A kernel of the SDPA convention (module docstring) as an op-protocol kernel.

    With ``takes_xp`` both functions take the namespace first (the array-API reference).
    """
    forward, backward = kernel.fwd, kernel.bwd

    def fwd(xp, arrays, options: SdpaOptions, save):
        lead = (xp,) if takes_xp else ()
        out, lse = forward(
            *lead,
            arrays["q"],
            arrays["k"],
            arrays["v"],
            mask=arrays["mask"],
            bias=arrays["bias"],
            **_sdpa_kwargs(options),
        )
        outs = (out, lse) if options.return_lse else (out,)
        return outs, (dict(arrays, out=out, lse=lse) if save else {})

    def bwd(xp, saved, options: SdpaOptions, cotangents):
        lead = (xp,) if takes_xp else ()
        dlse = cotangents[1] if options.return_lse else None
        dq, dk, dv, dbias = backward(
            *lead,
            saved["q"],
            saved["k"],
            saved["v"],
            saved["out"],
            saved["lse"],
            cotangents[0],
            dlse,
            mask=saved["mask"],
            bias=saved["bias"],
            **_sdpa_kwargs(options),
        )
        return {"q": dq, "k": dk, "v": dv, "bias": dbias}

    return dataclasses.replace(kernel, fwd=fwd, bwd=bwd)


SDPA_REFERENCE = sdpa_adapter(Kernel(sdpa_forward, sdpa_backward, dtypes=None), takes_xp=True)


# -- multi-head attention -----------------------------------------------------------------------


@dataclass(frozen=True)
class MhaOptions(Options):
    num_heads: int
    causal: bool | str | None
    biases: tuple[str, ...]  # the bias keys given in params, sorted


MHA_WEIGHTS = ("w_q", "w_k", "w_v", "w_o")
MHA_BIASES = ("b_q", "b_k", "b_v", "b_o")
MHA_RESIDUALS = ("x_q", "x_kv", *MHA_WEIGHTS, "attn")


def _project(xp, x, w, b, cdt):
    """``x wᵀ + b`` (PyTorch Linear) accumulated in the compute dtype, returned in x's dtype."""
    y = xp.matmul(xp.astype(x, cdt, copy=False), xp.matrix_transpose(xp.astype(w, cdt, copy=False)))
    if b is not None:
        y = y + xp.astype(b, cdt, copy=False)
    return xp.astype(y, x.dtype)


def _split_heads(xp, x, heads):
    n, length, width = x.shape
    return xp.permute_dims(xp.reshape(x, (n, length, heads, width // heads)), (0, 2, 1, 3))


def _merge_heads(xp, x):
    n, heads, length, width = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (n, length, heads * width))


def _mha_fwd(xp, arrays, options: MhaOptions, save, *, ops):
    p = arrays["params"]
    heads = options.num_heads
    x_q, x_kv = arrays["x_q"], arrays["x_kv"]
    cdt = compute_dtype(xp, x_q.dtype)
    q = _split_heads(xp, _project(xp, x_q, p["w_q"], p.get("b_q"), cdt), heads)
    k = _split_heads(xp, _project(xp, x_kv, p["w_k"], p.get("b_k"), cdt), heads)
    v = _split_heads(xp, _project(xp, x_kv, p["w_v"], p.get("b_v"), cdt), heads)
    sdpa = ops.scaled_dot_product_attention
    kwargs = {"mask": arrays["mask"], "causal": options.causal or False}
    if save:
        heads_out, attn_res = sdpa.fwd(q, k, v, **kwargs)
    else:
        heads_out, attn_res = sdpa(q, k, v, **kwargs), None
    y = _project(xp, _merge_heads(xp, heads_out), p["w_o"], p.get("b_o"), cdt)
    saved = {}
    if save:
        saved = {"x_q": x_q, "x_kv": x_kv, **{w: p[w] for w in MHA_WEIGHTS}, "attn": attn_res}
    return (y,), saved


def _linear_bwd(xp, x, w, dy, cdt, with_bias):
    """Gradients of ``y = x wᵀ + b`` over leading dims: (dx, dw, db)."""
    dyc = xp.astype(dy, cdt, copy=False)
    xc = xp.astype(x, cdt, copy=False)
    dx = xp.matmul(dyc, xp.astype(w, cdt, copy=False))
    flat_dy, flat_x = flat_rows(xp, dyc), flat_rows(xp, xc)
    dw = xp.matmul(xp.matrix_transpose(flat_dy), flat_x)
    db = xp.sum(flat_dy, axis=0) if with_bias else None
    return dx, dw, db


def _mha_bwd(xp, saved, options: MhaOptions, cotangents, *, ops):
    (dy,) = cotangents
    x_q, x_kv = saved["x_q"], saved["x_kv"]
    dtype = x_q.dtype
    cdt = compute_dtype(xp, dtype)
    biases = options.biases
    attn_res = saved["attn"]
    heads_out = attn_res.arrays["out"]
    d_concat, dw_o, db_o = _linear_bwd(
        xp, _merge_heads(xp, heads_out), saved["w_o"], dy, cdt, "b_o" in biases
    )
    d_heads = _split_heads(xp, xp.astype(d_concat, dtype), options.num_heads)
    g = ops.scaled_dot_product_attention.bwd(attn_res, d_heads)
    dx_q, dw_q, db_q = _linear_bwd(
        xp, x_q, saved["w_q"], _merge_heads(xp, g.q), cdt, "b_q" in biases
    )
    dxk, dw_k, db_k = _linear_bwd(
        xp, x_kv, saved["w_k"], _merge_heads(xp, g.k), cdt, "b_k" in biases
    )
    dxv, dw_v, db_v = _linear_bwd(
        xp, x_kv, saved["w_v"], _merge_heads(xp, g.v), cdt, "b_v" in biases
    )
    grads = {"w_q": dw_q, "w_k": dw_k, "w_v": dw_v, "w_o": dw_o}
    grads.update({"b_q": db_q, "b_k": db_k, "b_v": db_v, "b_o": db_o})
    params = {key: xp.astype(g_, dtype) for key, g_ in grads.items() if g_ is not None}
    return {
        "x_q": xp.astype(dx_q, dtype),
        "x_kv": xp.astype(dxk + dxv, dtype),
        "params": params,
    }


MHA_REFERENCE = Kernel(_mha_fwd, _mha_bwd, dtypes=None, uses=("scaled_dot_product_attention",))

"""Glue of the criss-cross family: options, residual schemas, reference kernels, the CCA convention.

Criss-cross attention kernels are written in a narrower convention than the op protocol::

    forward(q, k, v, *, scale) -> (out, lse)
    backward(q, k, v, out, lse, dout, *, scale) -> (dq, dk, dv)

and :func:`criss_cross_adapter` turns such a pair into the op protocol. The recurrent block is
composite: its reference runs 1×1 convolutions in array-API code and the attention core through
the ``criss_cross_attention`` op, on whichever backend the setting picks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.criss_cross import criss_cross_backward, criss_cross_forward
from .._xp import compute_dtype, flat_rows

__all__ = [
    "BLOCK_BIASES",
    "BLOCK_REFERENCE",
    "BLOCK_RESIDUALS",
    "BLOCK_WEIGHTS",
    "CCA_REFERENCE",
    "CCA_RESIDUALS",
    "BlockOptions",
    "CcaOptions",
    "criss_cross_adapter",
]


@dataclass(frozen=True)
class CcaOptions(Options):
    scale: float


@dataclass(frozen=True)
class BlockOptions(Options):
    recurrence: int
    biases: tuple[str, ...]  # the bias keys given in params, sorted


CCA_RESIDUALS = ("q", "k", "v", "out", "lse")


def criss_cross_adapter(kernel: Kernel, *, takes_xp: bool = False) -> Kernel:
    """A kernel of the CCA convention (module docstring) as an op-protocol kernel.

    With ``takes_xp`` both functions take the namespace first (the array-API reference).
    """
    forward, backward = kernel.fwd, kernel.bwd

    def fwd(xp, arrays, options, save):
        q, k, v = arrays["q"], arrays["k"], arrays["v"]
        out, lse = forward(*((xp,) if takes_xp else ()), q, k, v, scale=options.scale)
        return (out,), ({"q": q, "k": k, "v": v, "out": out, "lse": lse} if save else {})

    def bwd(xp, saved, options, cotangents):
        lead = (xp,) if takes_xp else ()
        dq, dk, dv = backward(
            *lead, saved["q"], saved["k"], saved["v"], saved["out"], saved["lse"], cotangents[0],
            scale=options.scale,
        )  # fmt: skip
        return {"q": dq, "k": dk, "v": dv}

    return dataclasses.replace(kernel, fwd=fwd, bwd=bwd)


CCA_REFERENCE = criss_cross_adapter(
    Kernel(criss_cross_forward, criss_cross_backward, dtypes=None), takes_xp=True
)


# -- the (recurrent) criss-cross block ----------------------------------------------------------

BLOCK_WEIGHTS = ("w_q", "w_k", "w_v")
BLOCK_BIASES = ("b_q", "b_k", "b_v")
BLOCK_RESIDUALS = ("x*", "attn*", *BLOCK_WEIGHTS, "gamma")


def _to_nhwc(xp, x):
    return xp.permute_dims(x, (0, 2, 3, 1))


def _to_nchw(xp, x):
    return xp.permute_dims(x, (0, 3, 1, 2))


def _conv1x1(xp, x_hwc, w, b, cdt):
    """A 1×1 convolution on a channel-last map: ``x wᵀ + b`` with w (out, in, 1, 1)."""
    w2 = xp.reshape(xp.astype(w, cdt, copy=False), tuple(w.shape[:2]))
    y = xp.matmul(xp.astype(x_hwc, cdt, copy=False), xp.matrix_transpose(w2))
    if b is not None:
        y = y + xp.astype(b, cdt, copy=False)
    return xp.astype(y, x_hwc.dtype)


def _conv1x1_bwd(xp, x_hwc, w, dy, cdt, with_bias):
    """(dx, dw (out, in, 1, 1), db) of :func:`_conv1x1`."""
    w2 = xp.reshape(xp.astype(w, cdt, copy=False), tuple(w.shape[:2]))
    dyc = xp.astype(dy, cdt, copy=False)
    dx = xp.matmul(dyc, w2)
    flat_dy, flat_x = flat_rows(xp, dyc), flat_rows(xp, xp.astype(x_hwc, cdt, copy=False))
    dw = xp.reshape(xp.matmul(xp.matrix_transpose(flat_dy), flat_x), tuple(w.shape))
    db = xp.sum(flat_dy, axis=0) if with_bias else None
    return dx, dw, db


def _ccb_ref_fwd(xp, arrays, options, save, *, ops):
    p = arrays["params"]
    x = arrays["x"]
    cdt = compute_dtype(xp, x.dtype)
    gamma = xp.astype(p["gamma"], cdt, copy=False)
    h = _to_nhwc(xp, x)
    saved = {}
    for r in range(options.recurrence):
        q = _conv1x1(xp, h, p["w_q"], p.get("b_q"), cdt)
        k = _conv1x1(xp, h, p["w_k"], p.get("b_k"), cdt)
        v = _conv1x1(xp, h, p["w_v"], p.get("b_v"), cdt)
        # The attention core runs on whichever backend the setting picks for it.
        if save:
            agg, res = ops.criss_cross_attention.fwd(q, k, v)
            saved[f"x{r}"] = h
            saved[f"attn{r}"] = res
        else:
            agg = ops.criss_cross_attention(q, k, v)
        h = xp.astype(
            gamma * xp.astype(agg, cdt, copy=False) + xp.astype(h, cdt, copy=False), x.dtype
        )
    if save:
        saved.update({name: p[name] for name in (*BLOCK_WEIGHTS, "gamma")})
    return (_to_nchw(xp, h),), saved


def _ccb_ref_bwd(xp, saved, options, cotangents, *, ops):
    (dy,) = cotangents
    dtype = dy.dtype
    cdt = compute_dtype(xp, dtype)
    biases = options.biases
    gamma = xp.astype(saved["gamma"], cdt, copy=False)
    dh = xp.astype(_to_nhwc(xp, dy), cdt, copy=False)
    grads = {name: None for name in (*BLOCK_WEIGHTS, *BLOCK_BIASES)}
    dgamma = None

    def add(a, b):
        return b if a is None else a + b

    for r in reversed(range(options.recurrence)):
        h_in, res = saved[f"x{r}"], saved[f"attn{r}"]
        agg = xp.astype(res.arrays["out"], cdt, copy=False)
        dgamma = add(dgamma, xp.reshape(xp.sum(dh * agg), (1,)))
        g = ops.criss_cross_attention.bwd(res, xp.astype(dh * gamma, dtype))
        dx = dh  # the residual
        for name, d in (("q", g.q), ("k", g.k), ("v", g.v)):
            dxi, dw, db = _conv1x1_bwd(xp, h_in, saved[f"w_{name}"], d, cdt, f"b_{name}" in biases)
            dx = dx + dxi
            grads[f"w_{name}"] = add(grads[f"w_{name}"], dw)
            if db is not None:
                grads[f"b_{name}"] = add(grads[f"b_{name}"], db)
        dh = dx
    params = {key: xp.astype(g_, dtype) for key, g_ in grads.items() if g_ is not None}
    params["gamma"] = xp.astype(dgamma, dtype)
    return {"x": xp.astype(_to_nchw(xp, dh), dtype), "params": params}


BLOCK_REFERENCE = Kernel(_ccb_ref_fwd, _ccb_ref_bwd, dtypes=None, uses=("criss_cross_attention",))

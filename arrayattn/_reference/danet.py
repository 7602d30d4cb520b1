"""Array-API reference forward/backward of DANet's position and channel attention.

Both modules are one softmax-attention core plus 1×1 convolutions and a ``γ``-scaled residual; the
core runs through :func:`arrayattn.scaled_dot_product_attention` (tiled, on the active backend)
and its :class:`~arrayattn.Residuals` are kept for backward:

* PAM: ``q = (W_q A)ᵀ``, ``k = (W_k A)ᵀ``, ``v = (W_v A)ᵀ`` over the ``P = H·W`` positions, scale 1;
* CAM: the channels are the tokens and the positions the features: ``q = v = A`` (C, P) and
  ``k = A`` (``'paper'``) or ``k = -A`` (``'code'``: ``softmax(rowmax(AAᵀ) - AAᵀ) =
  softmax(-AAᵀ)``).
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, compute_dtype
from .non_local import conv1x1_backward, conv1x1_forward, flat, transpose

__all__ = ["cam_backward", "cam_forward", "pam_backward", "pam_forward"]


def _c(xp: Any, a: Array, dtype: Any) -> Array:
    return xp.astype(a, dtype, copy=False)


def _gamma_scalar(xp: Any, gamma: Array, cdt: Any) -> Array:
    return xp.reshape(_c(xp, gamma, cdt), ())


def pam_forward(
    xp: Any, x: Array, p: dict[str, Array], save: bool, *, sdpa: Any
) -> tuple[Array, dict[str, Any]]:
    """``E = γ · (D softmax(BᵀC)ᵀ) + A``; returns (E, saved)."""

    n, c, h, w = x.shape
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    xf = flat(xp, x)
    proj = {
        name: conv1x1_forward(xp, xf, p[f"w_{name}"], p.get(f"b_{name}"), cdt)
        for name in ("query", "key", "value")
    }
    q, k, v = (_c(xp, transpose(xp, proj[name]), dtype) for name in ("query", "key", "value"))
    if save:
        o, attn = sdpa.fwd(q, k, v, scale=1.0)
    else:
        o, attn = sdpa(q, k, v, scale=1.0), None
    out = _c(xp, transpose(xp, o), cdt)  # (N, C, P)
    y = _gamma_scalar(xp, p["gamma"], cdt) * out + _c(xp, xf, cdt)
    y = xp.astype(xp.reshape(y, (n, c, h, w)), dtype)
    saved = {}
    if save:
        saved = {"x": x, "attn": attn, **{f"p_{k_}": a for k_, a in p.items()}}
    return y, saved


def pam_backward(
    xp: Any, saved: dict[str, Any], dy: Array, *, sdpa: Any
) -> tuple[Array, dict[str, Array]]:

    x = saved["x"]
    p = {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}
    n, c, h, w = x.shape
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    xf = flat(xp, x)
    dyf = _c(xp, flat(xp, dy), cdt)
    attn = saved["attn"]
    out = _c(xp, transpose(xp, attn.arrays["out"]), cdt)
    gamma = _gamma_scalar(xp, p["gamma"], cdt)
    grads: dict[str, Array] = {"gamma": xp.reshape(xp.sum(dyf * out), tuple(p["gamma"].shape))}
    g = sdpa.bwd(attn, _c(xp, transpose(xp, gamma * dyf), dtype))
    dx = dyf
    for name, d in (("query", g.q), ("key", g.k), ("value", g.v)):
        dxi, grads[f"w_{name}"], db = conv1x1_backward(
            xp, xf, p[f"w_{name}"], transpose(xp, d), cdt, f"b_{name}" in p
        )
        dx = dx + dxi
        if db is not None:
            grads[f"b_{name}"] = db
    dx = xp.astype(xp.reshape(dx, (n, c, h, w)), dtype)
    return dx, {k: xp.astype(v, dtype) for k, v in grads.items()}


def cam_forward(
    xp: Any, x: Array, gamma: Array, logits: str, save: bool, *, sdpa: Any
) -> tuple[Array, dict[str, Any]]:
    """``E = γ · softmax(±AAᵀ) A + A``; returns (E, saved)."""

    n, c, h, w = x.shape
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    a = flat(xp, x)  # (N, C, P): C tokens of width P
    k = a if logits == "paper" else -a
    if save:
        o, attn = sdpa.fwd(a, k, a, scale=1.0)
    else:
        o, attn = sdpa(a, k, a, scale=1.0), None
    y = _gamma_scalar(xp, gamma, cdt) * _c(xp, o, cdt) + _c(xp, a, cdt)
    y = xp.astype(xp.reshape(y, (n, c, h, w)), dtype)
    return y, ({"gamma": gamma, "attn": attn} if save else {})


def cam_backward(
    xp: Any, saved: dict[str, Any], logits: str, dy: Array, *, sdpa: Any
) -> tuple[Array, Array]:

    attn, gamma = saved["attn"], saved["gamma"]
    a = attn.arrays["q"]
    dtype = a.dtype
    cdt = compute_dtype(xp, dtype)
    n, c, npos = a.shape
    dyf = _c(xp, xp.reshape(dy, (n, c, npos)), cdt)
    o = _c(xp, attn.arrays["out"], cdt)
    dgamma = xp.reshape(xp.sum(dyf * o), tuple(gamma.shape))
    g = sdpa.bwd(attn, _c(xp, _gamma_scalar(xp, gamma, cdt) * dyf, dtype))
    dk = _c(xp, g.k, cdt)
    da = dyf + _c(xp, g.q, cdt) + _c(xp, g.v, cdt) + (dk if logits == "paper" else -dk)
    dx = xp.astype(xp.reshape(da, tuple(dy.shape)), dtype)
    return dx, xp.astype(dgamma, gamma.dtype)

"""Array-API reference of fused attention (single-output attention pooling).

Row-major notation (the spec's column convention transposed): ``S = scale · q kᵀ`` (..., M, L),
``P = softmax over the L keys`` of every query row (the spec's column-wise softmax of ``Kᵀ Q``),
``α = fuse_m(P)`` (..., L), ``pooled = α v`` (..., dv), ``y = g(pooled)`` with ``g`` an optional
Linear map. ``P`` is M×L: fused attention is meant for few queries, so it is materialised here.
"""

from __future__ import annotations

import math
from typing import Any

from .._xp import Array, compute_dtype, device_of
from .primitives import linear_backward, linear_forward

__all__ = ["fused_backward", "fused_forward"]


def _scores(xp: Any, q: Array, k: Array, mask: Array | None, scale: float, cdt: Any) -> Array:
    qc, kc = xp.astype(q, cdt, copy=False), xp.astype(k, cdt, copy=False)
    s = xp.matmul(qc, xp.matrix_transpose(kc)) * scale
    if mask is not None:
        s = xp.where(mask, s, xp.asarray(-math.inf, dtype=cdt, device=device_of(q)))
    return s


def _probs(xp: Any, s: Array) -> tuple[Array, Array]:
    """Row softmax of ``s`` and its logsumexp (``+inf``, probabilities 0 for a fully masked row)."""
    m = xp.max(s, axis=-1, keepdims=True)
    empty = m == -math.inf
    m = xp.where(empty, xp.zeros_like(m), m)
    e = xp.exp(s - m)
    ell = xp.sum(e, axis=-1, keepdims=True)
    safe = xp.where(empty, xp.ones_like(ell), ell)
    p = e / safe
    lse = xp.where(empty, xp.full_like(ell, math.inf), m + xp.log(safe))
    return p, lse[..., 0]


def _first_argmax_onehot(xp: Any, p: Array) -> Array:
    """One-hot (..., M, L) of the first maximum over the queries (axis -2) of every key column."""
    idx = xp.argmax(p, axis=-2, keepdims=True)  # (..., 1, L)
    rows = xp.reshape(xp.arange(p.shape[-2], device=device_of(p)), (p.shape[-2], 1))
    return rows == idx


def _fuse(xp: Any, p: Array, fuse: str) -> tuple[Array, Array | None]:
    """``α`` (..., L) and, for ``max``, the normaliser ``Z`` (..., 1)."""
    if fuse == "mean":
        return xp.mean(p, axis=-2), None
    top = xp.max(p, axis=-2)
    z = xp.sum(top, axis=-1, keepdims=True)
    safe = xp.where(z == 0, xp.ones_like(z), z)  # every query fully masked: α = 0
    return top / safe, z


def fused_forward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    scale: float,
    fuse: str,
    w_o: Array | None = None,
    b_o: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Returns ``(y, alpha, pooled, lse)``: y (..., Eo or dv) and alpha (..., L) in q's dtype,
    pooled (..., dv) in q's dtype, lse (..., M) in the compute dtype."""
    cdt = compute_dtype(xp, q.dtype)
    p, lse = _probs(xp, _scores(xp, q, k, mask, scale, cdt))
    alpha, _ = _fuse(xp, p, fuse)
    vc = xp.astype(v, cdt, copy=False)
    pooled = xp.matmul(alpha[..., None, :], vc)[..., 0, :]
    pooled = xp.astype(pooled, q.dtype)
    y = pooled if w_o is None else linear_forward(xp, pooled, w_o, b_o)
    return y, xp.astype(alpha, q.dtype), pooled, lse


def fused_backward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    lse: Array,
    dy: Array,
    dalpha: Array | None,
    *,
    mask: Array | None,
    scale: float,
    fuse: str,
    pooled: Array | None = None,
    w_o: Array | None = None,
    with_bias: bool = False,
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """Returns ``(dq, dk, dv, dw_o, db_o)`` (the last two None without an output map)."""
    cdt = compute_dtype(xp, q.dtype)
    dw_o = db_o = None
    if w_o is not None:
        dpooled, dw_o, db_o = linear_backward(xp, pooled, w_o, dy, with_bias)
    else:
        dpooled = dy
    s = _scores(xp, q, k, mask, scale, cdt)
    p = xp.exp(s - lse[..., None])  # masked: -inf; empty rows: lse = +inf; both give 0
    alpha, z = _fuse(xp, p, fuse)
    vc = xp.astype(v, cdt, copy=False)
    dpc = xp.astype(dpooled, cdt, copy=False)
    # pooled = α v:  dv = α ⊗ dpooled,  dα = v · dpooled
    dv = alpha[..., :, None] * dpc[..., None, :]
    da = xp.matmul(vc, dpc[..., :, None])[..., 0]
    if dalpha is not None:
        da = da + xp.astype(dalpha, cdt, copy=False)
    if fuse == "mean":
        dp = xp.broadcast_to(da[..., None, :] / p.shape[-2], p.shape)
    else:
        # α = top / Z, Z = Σ top:  dtop = (dα − ⟨dα, α⟩) / Z, routed to the first argmax query.
        safe = xp.where(z == 0, xp.ones_like(z), z)
        dtop = (da - xp.sum(da * alpha, axis=-1, keepdims=True)) / safe
        hit = _first_argmax_onehot(xp, p)
        dp = xp.where(hit, dtop[..., None, :], xp.zeros_like(p))
    ds = p * (dp - xp.sum(p * dp, axis=-1, keepdims=True))
    dq = xp.matmul(ds, xp.astype(k, cdt, copy=False)) * scale
    dk = xp.matmul(xp.matrix_transpose(ds), xp.astype(q, cdt, copy=False)) * scale
    return (
        xp.astype(dq, q.dtype),
        xp.astype(dk, k.dtype),
        xp.astype(dv, v.dtype),
        dw_o,
        db_o,
    )

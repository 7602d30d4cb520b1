"""Array-API reference of criss-cross attention (CCNet).

Pixel ``u = (y, x)`` attends jointly to the ``W`` keys of its row and the ``H - 1`` other keys of
its column (the self key is counted once: it belongs to the row part and is excluded from the
column part). Two batched products do all the work: along the row axis (``(..., H, W, W)``
logits) and, on the transposed maps, along the column axis (``(..., W, H, H)`` logits with the
diagonal masked). One softmax runs over both parts jointly through their shared row maximum and
logsumexp; no ``HW × HW`` matrix exists.

Residuals are ``q, k, v``, the output and the per-pixel logsumexp ``lse`` (``(..., H, W)``); the
backward pass recomputes the probabilities (``p = exp(s - lse)``).
"""

from __future__ import annotations

import math
from typing import Any

from .._xp import Array, compute_dtype, device_of

__all__ = ["criss_cross_backward", "criss_cross_forward"]


def _swap_hw(xp: Any, x: Array) -> Array:
    """(..., H, W, c) -> (..., W, H, c)."""
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def _logits(xp, qc, kc, scale, cdt):
    """Row logits (..., H, W, W) and column logits (..., W, H, H) with the self key at -inf."""
    s_row = xp.matmul(qc, xp.matrix_transpose(kc)) * scale
    qt, kt = _swap_hw(xp, qc), _swap_hw(xp, kc)
    s_col = xp.matmul(qt, xp.matrix_transpose(kt)) * scale
    h = qc.shape[-3]
    idx = xp.arange(h, device=device_of(qc))
    diag = idx[:, None] == idx[None, :]
    s_col = xp.where(diag, xp.asarray(-math.inf, dtype=cdt, device=device_of(qc)), s_col)
    return s_row, s_col, qt, kt


def criss_cross_forward(xp: Any, q: Array, k: Array, v: Array, *, scale: float):
    """Returns ``(out, lse)``: out (..., H, W, dv) in q's dtype, lse (..., H, W) in the compute
    dtype."""
    cdt = compute_dtype(xp, q.dtype)
    qc, kc, vc = (xp.astype(a, cdt, copy=False) for a in (q, k, v))
    s_row, s_col, _, _ = _logits(xp, qc, kc, scale, cdt)
    s_col_hw = _swap_hw(xp, s_col)  # (..., H, W, H): [y, x, y'] = q(y,x)·k(y',x)
    m = xp.maximum(xp.max(s_row, axis=-1), xp.max(s_col_hw, axis=-1))  # finite: self key in row
    e_row = xp.exp(s_row - m[..., None])
    e_col = xp.exp(s_col - _swap_hw(xp, m[..., None]))  # row max broadcast as (..., W, H, 1)
    ell = xp.sum(e_row, axis=-1) + xp.sum(_swap_hw(xp, e_col), axis=-1)
    agg = xp.matmul(e_row, vc) + _swap_hw(xp, xp.matmul(e_col, _swap_hw(xp, vc)))
    out = agg / ell[..., None]
    lse = m + xp.log(ell)
    return xp.astype(out, q.dtype), lse


def criss_cross_backward(
    xp: Any, q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, *, scale: float
):
    """Returns ``(dq, dk, dv)`` in the input dtypes (derivation:
    docs/derivations/criss_cross.rst)."""
    cdt = compute_dtype(xp, q.dtype)
    qc, kc, vc = (xp.astype(a, cdt, copy=False) for a in (q, k, v))
    doc = xp.astype(dout, cdt, copy=False)
    delta = xp.sum(doc * xp.astype(out, cdt, copy=False), axis=-1)  # D_u = dO_u · O_u
    s_row, s_col, qt, kt = _logits(xp, qc, kc, scale, cdt)
    vt, dot = _swap_hw(xp, vc), _swap_hw(xp, doc)
    lse_t, delta_t = _swap_hw(xp, lse[..., None]), _swap_hw(xp, delta[..., None])  # (..., W, H, 1)

    # Row part, batched over (..., y): queries x, keys x'.
    p = xp.exp(s_row - lse[..., None])
    dv = xp.matmul(xp.matrix_transpose(p), doc)
    ds = p * (xp.matmul(doc, xp.matrix_transpose(vc)) - delta[..., None])
    dq = xp.matmul(ds, kc)
    dk = xp.matmul(xp.matrix_transpose(ds), qc)

    # Column part, batched over (..., x): queries y, keys y' != y (p = 0 on the diagonal).
    p = xp.exp(s_col - lse_t)
    dv_t = xp.matmul(xp.matrix_transpose(p), dot)
    ds = p * (xp.matmul(dot, xp.matrix_transpose(vt)) - delta_t)
    dq_t = xp.matmul(ds, kt)
    dk_t = xp.matmul(xp.matrix_transpose(ds), qt)

    dq = (dq + _swap_hw(xp, dq_t)) * scale
    dk = (dk + _swap_hw(xp, dk_t)) * scale
    dv = dv + _swap_hw(xp, dv_t)
    return xp.astype(dq, q.dtype), xp.astype(dk, k.dtype), xp.astype(dv, v.dtype)

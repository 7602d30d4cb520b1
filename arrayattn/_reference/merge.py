"""Array-API reference of merge_attention: combining partial attention over disjoint key sets.

Plain ``xp.*`` code, no in-place writes. Part ``i`` is an attention output ``o_i (..., L, dv)``
over some keys with its per-row logsumexp ``l_i (..., L)``; the parts together cover the union of
their keys (xformers ``merge_attentions``, FlashAttention's split-KV combine)::

    lse = log Σ_i exp(l_i)        p_i = exp(l_i - lse)        out = Σ_i p_i o_i

A part that attended no key has ``l_i = +inf`` (this library's convention, which makes
``exp(s - lse) = 0`` in attention backward); here it stands for ``-inf``: weight 0, whatever its
output holds. A row that no part attended gives ``out = 0``, ``lse = +inf``. With ``dO, dlse`` the
cotangents::

    d o_i   = p_i dO
    d l_i   = p_i (dO·o_i - dO·out + dlse)

(``∂out/∂l_i = p_i (o_i - out)``, ``∂lse/∂l_i = p_i``). Rows of an empty part get zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._xp import Array, compute_dtype

__all__ = ["merge_backward", "merge_forward"]


def _dtypes(xp: Any, out_dtype: Any, lse_dtype: Any) -> Any:
    """The dtype the merge computes in: at least float32, at least the logsumexp's precision."""
    return xp.result_type(compute_dtype(xp, out_dtype), lse_dtype)


def _as_log_weights(xp: Any, lse: Array, cdt: Any) -> Array:
    """``l`` with ``+inf`` (an empty part) turned into ``-inf`` (a zero weight)."""
    lc = xp.astype(lse, cdt, copy=False)
    return xp.where(xp.isinf(lc), -xp.inf, lc)


def _weights(xp: Any, logs: Sequence[Array], lse: Array) -> list[Array]:
    """``p_i = exp(l_i - lse)``; 0 for an empty part and for every part of an empty row."""
    # lse is +inf on an empty row and every l_i is -inf there: (-inf) - (+inf) = -inf, exp = 0.
    return [xp.exp(li - lse) for li in logs]


def _live(xp: Any, oi: Array, pi: Array, cdt: Any) -> Array:
    """``o_i`` in the compute dtype, 0 where its weight is 0: an empty part weighs nothing
    whatever its output holds (0·inf would be NaN)."""
    return xp.where(pi[..., None] > 0, xp.astype(oi, cdt, copy=False), 0.0)


def merge_forward(xp: Any, outs: Sequence[Array], lses: Sequence[Array]) -> tuple[Array, Array]:
    """``(out, lse)`` of the merged parts: out in the parts' dtype, lse in the lses' dtype."""
    cdt = _dtypes(xp, outs[0].dtype, lses[0].dtype)
    logs = [_as_log_weights(xp, li, cdt) for li in lses]
    m = logs[0]
    for li in logs[1:]:
        m = xp.maximum(m, li)
    empty = m == -xp.inf
    m_safe = xp.where(empty, 0.0, m)
    total = xp.zeros_like(m)
    for li in logs:
        total = total + xp.exp(li - m_safe)
    lse = xp.where(empty, xp.inf, m_safe + xp.log(xp.where(empty, 1.0, total)))
    out = None
    for oi, pi in zip(outs, _weights(xp, logs, lse), strict=True):
        term = pi[..., None] * _live(xp, oi, pi, cdt)
        out = term if out is None else out + term
    return xp.astype(out, outs[0].dtype), xp.astype(lse, lses[0].dtype)


def merge_backward(
    xp: Any,
    outs: Sequence[Array],
    lses: Sequence[Array],
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array | None,
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """``(d outs, d lses)``, each a tuple with one gradient per part, in the parts' dtypes."""
    cdt = _dtypes(xp, outs[0].dtype, lses[0].dtype)
    logs = [_as_log_weights(xp, li, cdt) for li in lses]
    weights = _weights(xp, logs, xp.astype(lse, cdt, copy=False))
    doc = xp.astype(dout, cdt, copy=False)
    # dO·out once; dlse (zero for an unused output) joins it, since both pair with every p_i.
    base = xp.sum(doc * xp.astype(out, cdt, copy=False), axis=-1)
    if dlse is not None:
        base = base - xp.astype(dlse, cdt, copy=False)
    douts, dlses = [], []
    for oi, pi in zip(outs, weights, strict=True):
        douts.append(xp.astype(pi[..., None] * doc, outs[0].dtype))
        dot = xp.sum(doc * _live(xp, oi, pi, cdt), axis=-1)
        dlses.append(xp.astype(pi * (dot - base), lses[0].dtype))
    return tuple(douts), tuple(dlses)

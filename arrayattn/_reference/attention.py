"""Array-API reference of scaled dot-product attention: FlashAttention-2 forward and backward.

Plain ``xp.*`` code, no in-place writes, so it runs on numpy, cupy, torch, jax and array_api_strict.
Queries and keys are processed in tiles with an online softmax (docs/derivations/attention.rst),
so the extra memory is a few (batch, block_q, block_k) tiles plus O(L·d) accumulators, never
Lq×Lk.

Notation follows the spec: ``s = scale·q kᵀ + bias`` (``-inf`` where masked), ``p = exp(s - lse)``,
``D = rowsum(dO ⊙ O)``, ``ds = p ⊙ (dp - D + dlse)``.
"""

from __future__ import annotations

import math
from typing import Any

from .._xp import Array, compute_dtype, device_of, sum_to_shape

__all__ = ["causal_offset", "sdpa_backward", "sdpa_forward", "tile_sizes"]

#: Key-tile width, and the budget of score-tile elements (batch · block_q · block_k) per step.
BLOCK_K = 512
TILE_ELEMENTS = 1 << 21


def tile_sizes(nbatch: int, lq: int, lk: int) -> tuple[int, int]:
    """Default (block_q, block_k): key tiles of BLOCK_K, query tiles filling the element budget."""
    block_k = max(1, min(lk, BLOCK_K))
    block_q = max(1, min(lq, TILE_ELEMENTS // max(1, nbatch * block_k)))
    return block_q, block_k


def causal_offset(causal: str | None, lq: int, lk: int) -> int | None:
    """Key j is kept for query i iff ``j <= i + offset``; None when not causal."""
    if causal is None:
        return None
    return 0 if causal == "top_left" else lk - lq


def _ranges(n: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, n)) for i in range(0, n, block)]


def _tile(a: Array | None, i0: int, i1: int, j0: int, j1: int) -> Array | None:
    """The (rows i0:i1, cols j0:j1) tile of a mask or bias broadcastable to (..., Lq, Lk)."""
    if a is None:
        return None
    rows = slice(i0, i1) if a.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if a.shape[-1] != 1 else slice(None)
    return a[..., rows, cols]


def _as_2d_or_more(xp: Any, a: Array | None) -> Array | None:
    """View a mask or bias with at least two dimensions (it broadcasts against (..., Lq, Lk))."""
    if a is None or a.ndim >= 2:
        return a
    return xp.reshape(a, (1,) * (2 - a.ndim) + tuple(a.shape))


def _expand_kv(xp: Any, x: Array, groups: int) -> Array:
    """Repeat each kv head ``groups`` times along axis -3 (query head h uses kv head h //
    groups)."""
    if groups == 1:
        return x
    shape = tuple(x.shape)
    x = xp.expand_dims(x, axis=-3)
    x = xp.broadcast_to(x, shape[:-2] + (groups,) + shape[-2:])
    return xp.reshape(x, shape[:-3] + (shape[-3] * groups,) + shape[-2:])


def _reduce_kv(xp: Any, dx: Array, groups: int) -> Array:
    """Adjoint of :func:`_expand_kv`: sum the gradients of each kv head's query-head group."""
    if groups == 1:
        return dx
    shape = tuple(dx.shape)
    dx = xp.reshape(dx, shape[:-3] + (shape[-3] // groups, groups) + shape[-2:])
    return xp.sum(dx, axis=-3)


class _Scores:
    """Computes a tile of masked, scaled, biased logits; shared by forward and backward."""

    def __init__(self, xp, q, k, mask, bias, causal, scale, cdt):
        self.xp, self.q, self.k, self.scale, self.cdt = xp, q, k, scale, cdt
        self.mask = _as_2d_or_more(xp, mask)
        self.bias = _as_2d_or_more(xp, bias)
        lq, lk = q.shape[-2], k.shape[-2]
        self.offset = causal_offset(causal, lq, lk)
        self.device = device_of(q)
        self.neg_inf = xp.asarray(-math.inf, dtype=cdt, device=self.device)

    def skipped(self, i0: int, i1: int, j0: int) -> bool:
        """Whether causality masks the whole tile (its first key lies after the last query's)."""
        return self.offset is not None and j0 > i1 - 1 + self.offset

    def __call__(self, i0: int, i1: int, j0: int, j1: int) -> Array:
        xp = self.xp
        s = xp.matmul(self.q[..., i0:i1, :], xp.matrix_transpose(self.k[..., j0:j1, :]))
        s = s * self.scale
        bias = _tile(self.bias, i0, i1, j0, j1)
        if bias is not None:
            s = s + xp.astype(bias, self.cdt)
        keep = _tile(self.mask, i0, i1, j0, j1)
        if self.offset is not None and j1 - 1 > i0 + self.offset:  # the tile crosses the diagonal
            rows = xp.arange(i0, i1, device=self.device)[:, None]
            cols = xp.arange(j0, j1, device=self.device)[None, :]
            band = cols <= rows + self.offset
            keep = band if keep is None else xp.logical_and(keep, band)
        if keep is not None:
            s = xp.where(keep, s, self.neg_inf)
        return s


def _prepare(xp, q, k, v, gqa_groups):
    cdt = compute_dtype(xp, q.dtype)
    qc = xp.astype(q, cdt, copy=False)
    kc = _expand_kv(xp, xp.astype(k, cdt, copy=False), gqa_groups)
    vc = _expand_kv(xp, xp.astype(v, cdt, copy=False), gqa_groups)
    return cdt, qc, kc, vc


def sdpa_forward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: str | None = None,
    scale: float,
    gqa_groups: int = 1,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Tiled forward. Returns ``(out, lse)``: out (..., Lq, dv) in q's dtype, lse (..., Lq) in the
    compute dtype (float32 for float16/bfloat16), ``+inf`` for rows with nothing to attend to."""
    cdt, qc, kc, vc = _prepare(xp, q, k, v, gqa_groups)
    batch, lq, lk, dv = tuple(qc.shape[:-2]), qc.shape[-2], kc.shape[-2], vc.shape[-1]
    nbatch = math.prod(batch)
    default_q, default_k = tile_sizes(nbatch, lq, lk)
    block_q, block_k = block_q or default_q, block_k or default_k
    scores = _Scores(xp, qc, kc, mask, bias, causal, scale, cdt)
    zero = xp.asarray(0.0, dtype=cdt, device=scores.device)
    one = xp.asarray(1.0, dtype=cdt, device=scores.device)
    inf = xp.asarray(math.inf, dtype=cdt, device=scores.device)

    outs, lses = [], []
    for i0, i1 in _ranges(lq, block_q):
        m = xp.full(batch + (i1 - i0,), -math.inf, dtype=cdt, device=scores.device)
        ell = xp.zeros(batch + (i1 - i0,), dtype=cdt, device=scores.device)
        acc = xp.zeros(batch + (i1 - i0, dv), dtype=cdt, device=scores.device)
        for j0, j1 in _ranges(lk, block_k):
            if scores.skipped(i0, i1, j0):
                break  # every later key tile lies further past the diagonal
            s = scores(i0, i1, j0, j1)
            m_new = xp.maximum(m, xp.max(s, axis=-1))
            # A row masked so far has m_new = -inf; subtracting 0 instead keeps exp() at 0, not NaN.
            m_use = xp.where(m_new == -math.inf, zero, m_new)
            p = xp.exp(s - m_use[..., None])
            correction = xp.exp(m - m_use)
            ell = correction * ell + xp.sum(p, axis=-1)
            acc = correction[..., None] * acc + xp.matmul(p, vc[..., j0:j1, :])
            m = m_new
        empty = ell == 0  # nothing to attend to (NaN rows are not empty: NaN propagates)
        safe_l = xp.where(empty, one, ell)
        outs.append(acc / safe_l[..., None])
        lses.append(xp.where(empty, inf, m + xp.log(safe_l)))
    if not outs:  # Lq == 0
        out = xp.zeros(batch + (0, dv), dtype=cdt, device=scores.device)
        lse = xp.zeros(batch + (0,), dtype=cdt, device=scores.device)
    else:
        out, lse = xp.concat(outs, axis=-2), xp.concat(lses, axis=-1)
    return xp.astype(out, q.dtype), lse


def sdpa_backward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array | None = None,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: str | None = None,
    scale: float,
    gqa_groups: int = 1,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array, Array, Array | None]:
    """Tiled backward (FA2 Alg. 2). Returns ``(dq, dk, dv, dbias)``; dbias has bias's shape."""
    cdt, qc, kc, vc = _prepare(xp, q, k, v, gqa_groups)
    batch, lq, lk = tuple(qc.shape[:-2]), qc.shape[-2], kc.shape[-2]
    d, dv = qc.shape[-1], vc.shape[-1]
    nbatch = math.prod(batch)
    default_q, default_k = tile_sizes(nbatch, lq, lk)
    block_q, block_k = block_q or default_q, block_k or default_k
    scores = _Scores(xp, qc, kc, mask, bias, causal, scale, cdt)
    doc = xp.astype(dout, cdt, copy=False)
    # D_i = sum_j P_ij dP_ij = dO_i · O_i, with O the output actually returned (in q's dtype).
    delta = xp.sum(doc * xp.astype(out, cdt, copy=False), axis=-1)
    if dlse is not None:
        delta = delta - xp.astype(dlse, cdt, copy=False)  # d lse_i / d s_ij = p_ij
    dev = scores.device

    q_ranges, k_ranges = _ranges(lq, block_q), _ranges(lk, block_k)
    dk_tiles = [xp.zeros(batch + (j1 - j0, d), dtype=cdt, device=dev) for j0, j1 in k_ranges]
    dv_tiles = [xp.zeros(batch + (j1 - j0, dv), dtype=cdt, device=dev) for j0, j1 in k_ranges]
    # dbias is tiled like the scores along the axes bias spans, and is one tile along the others.
    bias2 = scores.bias
    if bias2 is not None:
        bias_rows, bias_cols = bias2.shape[-2] != 1, bias2.shape[-1] != 1
        lead = tuple(bias2.shape[:-2])
        dbias_tiles = [
            [
                xp.zeros(lead + (i1 - i0, j1 - j0), dtype=cdt, device=dev)
                for j0, j1 in (k_ranges if bias_cols else [(0, 1)])
            ]
            for i0, i1 in (q_ranges if bias_rows else [(0, 1)])
        ]
    dq_tiles = []
    for ti, (i0, i1) in enumerate(q_ranges):
        qi, doi = qc[..., i0:i1, :], doc[..., i0:i1, :]
        lse_i, delta_i = lse[..., i0:i1, None], delta[..., i0:i1, None]
        dq_i = xp.zeros(batch + (i1 - i0, d), dtype=cdt, device=dev)
        for tj, (j0, j1) in enumerate(k_ranges):
            if scores.skipped(i0, i1, j0):
                break
            kj, vj = kc[..., j0:j1, :], vc[..., j0:j1, :]
            # Masked logits are -inf and empty rows have lse = +inf: both give p = 0 exactly.
            p = xp.exp(scores(i0, i1, j0, j1) - lse_i)
            dv_tiles[tj] = dv_tiles[tj] + xp.matmul(xp.matrix_transpose(p), doi)
            dp = xp.matmul(doi, xp.matrix_transpose(vj))
            ds = p * (dp - delta_i)
            dq_i = dq_i + xp.matmul(ds, kj)
            dk_tiles[tj] = dk_tiles[tj] + xp.matmul(xp.matrix_transpose(ds), qi)
            if bias2 is not None:
                bi, bj = (ti if bias_rows else 0), (tj if bias_cols else 0)
                tile = dbias_tiles[bi][bj]
                dbias_tiles[bi][bj] = tile + sum_to_shape(xp, ds, tuple(tile.shape))
        dq_tiles.append(dq_i * scale)

    def cat(tiles, shape, axis):
        return xp.concat(tiles, axis=axis) if tiles else xp.zeros(shape, dtype=cdt, device=dev)

    dq = cat(dq_tiles, batch + (0, d), -2)
    dk = _reduce_kv(xp, cat(dk_tiles, batch + (0, d), -2) * scale, gqa_groups)
    dvv = _reduce_kv(xp, cat(dv_tiles, batch + (0, dv), -2), gqa_groups)
    dbias = None
    if bias is not None:
        if 0 in tuple(bias2.shape):
            dbias = xp.zeros(tuple(bias2.shape), dtype=cdt, device=dev)
        else:
            dbias = xp.concat([xp.concat(row, axis=-1) for row in dbias_tiles], axis=-2)
        dbias = xp.astype(xp.reshape(dbias, tuple(bias.shape)), bias.dtype)
    return (
        xp.astype(dq, q.dtype),
        xp.astype(dk, k.dtype),
        xp.astype(dvv, v.dtype),
        dbias,
    )

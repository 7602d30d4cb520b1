"""Array-API reference of the Sparse Transformer factorised attention.

Block-sparse execution: a pattern is split into disjoint *parts*, each of which is a dense
attention on a regular rearrangement of the sequence, run with the tiled FlashAttention reference
(:func:`arrayattn._reference.attention.sdpa_forward` / ``sdpa_backward``):

``band(w)``
    keys ``i-w < j <= i``: query tiles of ``T >= w - 1`` rows, each against the keys of its own
    and the previous tile (a batched call over all tiles with a (tiles, T, 2T) band mask; the
    strided pattern's local part).
``residue(l, s)``
    keys ``j ≡ i (mod l)``, ``j <= i - s·l``: the sequence is regrouped by residue mod ``l``
    (``(n, l) -> (l, n)``), which turns the strided part into causal attention over ``L / l``
    positions (bottom-right aligned with ``s`` keys dropped), as in openai's ``strided_transpose``.
``block(l)``
    keys in the query's own block of ``l``, ``j <= i``: causal attention per block.
``summary_prev(l, lo, hi)``
    keys ``j`` in earlier blocks with ``lo <= j mod l < hi``: block ``b`` of queries attends to
    the first ``b·(hi - lo)`` gathered summary keys.
``summary_own(l, lo, hi)``
    keys of the query's own block with ``lo <= j mod l < hi`` and ``j <= i``.

Every part returns its output and logsumexp; the parts are merged by their logsumexps (one joint
softmax). Backward runs each part's FlashAttention backward with the *final* output and
logsumexp, which gives exactly that part's share of the joint-softmax gradient, and sums. The
work is proportional to the attended pairs (up to the tile edges) and no L×L array exists.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .._xp import Array, compute_dtype, device_of
from .attention import sdpa_backward, sdpa_forward

__all__ = ["REFERENCE_ATTENTION", "head_parts", "sparse_backward", "sparse_forward"]


def head_parts(
    pattern: str,
    stride: int,
    summary: int | None,
    local_width: int | None,
    combine: str,
    layer: int,
    num_heads: int,
) -> list[tuple]:
    """The disjoint parts of every head's key set (one tuple of parts per head)."""
    ell = stride

    def which(sel):  # sel: 'merged', 1 or 2 (the paper's A^(1), A^(2)); h' for fixed sub-blocks
        if pattern == "strided":
            w = local_width
            if sel == "merged":
                return (("band", w), ("residue", ell, (w - 1) // ell + 1))
            return (("band", w),) if sel == 1 else (("residue", ell, 0),)
        c = summary
        if sel == 1:
            return (("block", ell),)
        if sel == 2:
            return (("summary_prev", ell, ell - c, ell), ("summary_own", ell, ell - c, ell))
        sub = 0 if sel == "merged" else sel[1]
        return (("block", ell), ("summary_prev", ell, ell - (sub + 1) * c, ell - sub * c))

    if combine == "merged":
        return [which("merged")] * num_heads
    if combine == "interleaved":
        return [which(layer % 2 + 1)] * num_heads
    if pattern == "strided":  # multihead: heads alternate between A^(1) and A^(2)
        return [which(h % 2 + 1) for h in range(num_heads)]
    assert summary is not None  # 'fixed' patterns always have one (validated by the op)
    return [which(("sub", h % (ell // summary))) for h in range(num_heads)]


# -- helpers ------------------------------------------------------------------------------------


def _zeros(xp, shape, like):
    return xp.zeros(shape, dtype=like.dtype, device=device_of(like))


def _pad_rows(xp, x, n, value=0.0):
    """Append ``n`` rows (axis -2 for (..., L, c), axis -1 for (..., L)) filled with value."""
    if n == 0:
        return x
    if x.ndim >= 1 and value != 0.0:
        pad = xp.full(tuple(x.shape[:-1]) + (n,), value, dtype=x.dtype, device=device_of(x))
        return xp.concat([x, pad], axis=-1)
    pad = _zeros(xp, tuple(x.shape[:-2]) + (n, x.shape[-1]), x)
    return xp.concat([x, pad], axis=-2)


def _blocks(xp, x, ell):
    """(..., L, c) -> (..., L/l, l, c)."""
    return xp.reshape(x, tuple(x.shape[:-2]) + (x.shape[-2] // ell, ell, x.shape[-1]))


def _unblocks(xp, x):
    return xp.reshape(x, tuple(x.shape[:-3]) + (x.shape[-3] * x.shape[-2], x.shape[-1]))


def _swap(xp, x):
    """Swap axes -3 and -2."""
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def _compact(xp, x):
    """``x`` laid out contiguously (a reshape through a merged axis copies a permuted view);
    strided operands make batched matmuls fall off the BLAS path."""
    shape = tuple(x.shape)
    return xp.reshape(xp.reshape(x, shape[:-3] + (shape[-3] * shape[-2], shape[-1])), shape)


def _residue(xp, x, ell):
    """(..., L, c) -> (..., l, L/l, c): position t·l + r goes to [r, t]."""
    return _compact(xp, _swap(xp, _blocks(xp, x, ell)))


def _unresidue(xp, x):
    return _unblocks(xp, _compact(xp, _swap(xp, x)))


def _lse_rows(xp, lse, fn):
    """Apply a (..., L, c) rearrangement to a (..., L) array."""
    return fn(lse[..., None])[..., 0]


def _band_geometry(length, w):
    """Tile length T (>= w - 1, so a tile's keys lie in it and the previous tile) and count."""
    t = max(w - 1, 128)
    return t, -(-length // t)


def _band_windows(xp, x, t, nt):
    """(..., L, c) -> (..., nt, 2T, c): tile i's rows preceded by tile i-1's (zeros for i = 0)."""
    x = _pad_rows(xp, x, nt * t - x.shape[-2])
    tiles = _blocks(xp, x, t)
    lead = tuple(tiles.shape[:-3])
    prev = xp.concat([_zeros(xp, lead + (1, t, x.shape[-1]), x), tiles[..., :-1, :, :]], axis=-3)
    return xp.concat([prev, tiles], axis=-2)


def _band_unwindows(xp, g, t, length):
    """Adjoint of :func:`_band_windows`: (..., nt, 2T, c) -> (..., L, c)."""
    prev, own = g[..., :t, :], g[..., t:, :]
    lead = tuple(g.shape[:-3])
    shifted = xp.concat([prev[..., 1:, :, :], _zeros(xp, lead + (1, t, g.shape[-1]), g)], axis=-3)
    return _unblocks(xp, own + shifted)[..., :length, :]


def _band_mask(xp, t, nt, w, dev):
    """(nt, T, 2T) keep-mask of the windows: 0 <= i - j < w, and j >= 0 (tile 0 has no
    previous tile). Within a window ``i - j = a - b + T`` does not depend on the tile."""
    a = xp.arange(t, device=dev)[:, None]
    b = xp.arange(2 * t, device=dev)[None, :]
    diff = a - b + t
    band = xp.logical_and(diff >= 0, diff < w)  # (T, 2T)
    exists = xp.logical_or(xp.arange(nt, device=dev)[:, None] > 0, b >= t)  # (nt, 2T)
    return xp.logical_and(band, exists[:, None, :])


def _summary(xp, x, ell, lo, hi):
    """The summary rows lo:hi of every block: (..., n, hi-lo, c)."""
    return _blocks(xp, x, ell)[..., lo:hi, :]


def _unsummary(xp, ds, ell, lo, hi):
    """Adjoint of :func:`_summary`: (..., n, hi-lo, c) -> (..., L, c) with zeros elsewhere."""
    lead = tuple(ds.shape[:-2])
    parts = [
        _zeros(xp, lead + (lo, ds.shape[-1]), ds),
        ds,
        _zeros(xp, lead + (ell - hi, ds.shape[-1]), ds),
    ]
    return _unblocks(xp, xp.concat(parts, axis=-2))


def _own_mask(xp, ell, lo, hi, dev):
    o = xp.arange(ell, device=dev)[:, None]
    u = xp.arange(lo, hi, device=dev)[None, :]
    return u <= o


# -- the parts: forward returns (out, lse), backward (dq, dk, dv); all (..., Lp, ·) ---------------


def _part_forward(xp, part, q, k, v, scale, ops):
    kind, dev = part[0], device_of(q)
    length = q.shape[-2]
    if kind == "band":
        # all query tiles in one batched call: tile i against the keys of tiles i-1 and i
        w = part[1]
        t, nt = _band_geometry(length, w)
        qt = _blocks(xp, _pad_rows(xp, q, nt * t - length), t)
        o, lse = ops[0](
            xp,
            qt,
            _band_windows(xp, k, t, nt),
            _band_windows(xp, v, t, nt),
            mask=_band_mask(xp, t, nt, w, dev),
            scale=scale,
        )
        return (
            _unblocks(xp, o)[..., :length, :],
            _lse_rows(xp, lse, lambda a: _unblocks(xp, a))[..., :length],
        )
    if kind == "residue":
        ell, s = part[1], part[2]
        n = length // ell
        if n - s <= 0:
            return None
        qr, kr, vr = (_residue(xp, a, ell) for a in (q, k, v))
        o, lse = ops[0](
            xp, qr, kr[..., : n - s, :], vr[..., : n - s, :], causal="bottom_right", scale=scale
        )
        return _unresidue(xp, o), _lse_rows(xp, lse, lambda a: _unresidue(xp, a))
    if kind == "block":
        ell = part[1]
        qb, kb, vb = (_blocks(xp, a, ell) for a in (q, k, v))
        o, lse = ops[0](xp, qb, kb, vb, causal="top_left", scale=scale)
        return _unblocks(xp, o), _lse_rows(xp, lse, lambda a: _unblocks(xp, a))
    if kind == "summary_own":
        ell, lo, hi = part[1:]
        qb = _blocks(xp, q, ell)
        o, lse = ops[0](
            xp,
            qb,
            _summary(xp, k, ell, lo, hi),
            _summary(xp, v, ell, lo, hi),
            mask=_own_mask(xp, ell, lo, hi, dev),
            scale=scale,
        )
        return _unblocks(xp, o), _lse_rows(xp, lse, lambda a: _unblocks(xp, a))
    # summary_prev
    ell, lo, hi = part[1:]
    n, c = length // ell, hi - lo
    if n < 2:
        return None
    ks, vs = (_unblocks(xp, _summary(xp, a, ell, lo, hi)) for a in (k, v))  # (..., n·c, ·)
    batch = tuple(q.shape[:-2])
    outs = [_zeros(xp, batch + (ell, v.shape[-1]), v)]
    lses = [xp.full(batch + (ell,), math.inf, dtype=q.dtype, device=dev)]
    for b in range(1, n):
        o, lse = ops[0](
            xp,
            q[..., b * ell : (b + 1) * ell, :],
            ks[..., : b * c, :],
            vs[..., : b * c, :],
            scale=scale,
        )
        outs.append(o)
        lses.append(lse)
    return xp.concat(outs, axis=-2), xp.concat(lses, axis=-1)


def _part_backward(xp, part, q, k, v, out, lse, dout, scale, ops):
    kind, dev = part[0], device_of(q)
    length = q.shape[-2]
    if kind == "band":
        w = part[1]
        t, nt = _band_geometry(length, w)
        pad = nt * t - length
        qt, ot, dt = (_blocks(xp, _pad_rows(xp, a, pad), t) for a in (q, out, dout))
        lt = _lse_rows(xp, _pad_rows(xp, lse, pad, value=math.inf), lambda a: _blocks(xp, a, t))
        dq, dk, dv = ops[1](
            xp,
            qt,
            _band_windows(xp, k, t, nt),
            _band_windows(xp, v, t, nt),
            ot,
            lt,
            dt,
            mask=_band_mask(xp, t, nt, w, dev),
            scale=scale,
        )[:3]
        return (
            _unblocks(xp, dq)[..., :length, :],
            _band_unwindows(xp, dk, t, length),
            _band_unwindows(xp, dv, t, length),
        )
    if kind == "residue":
        ell, s = part[1], part[2]
        n = length // ell
        qr, kr, vr, orr, dor = (_residue(xp, a, ell) for a in (q, k, v, out, dout))
        lr = _lse_rows(xp, lse, lambda a: _residue(xp, a, ell))
        dq, dk, dv = ops[1](
            xp,
            qr,
            kr[..., : n - s, :],
            vr[..., : n - s, :],
            orr,
            lr,
            dor,
            causal="bottom_right",
            scale=scale,
        )[:3]
        dk, dv = _pad_rows(xp, dk, s), _pad_rows(xp, dv, s)
        return _unresidue(xp, dq), _unresidue(xp, dk), _unresidue(xp, dv)
    if kind == "block":
        ell = part[1]
        args = [_blocks(xp, a, ell) for a in (q, k, v, out)]
        lb = _lse_rows(xp, lse, lambda a: _blocks(xp, a, ell))
        grads = ops[1](xp, *args, lb, _blocks(xp, dout, ell), causal="top_left", scale=scale)
        return tuple(_unblocks(xp, g) for g in grads[:3])
    if kind == "summary_own":
        ell, lo, hi = part[1:]
        lb = _lse_rows(xp, lse, lambda a: _blocks(xp, a, ell))
        dq, dk, dv = ops[1](
            xp,
            _blocks(xp, q, ell),
            _summary(xp, k, ell, lo, hi),
            _summary(xp, v, ell, lo, hi),
            _blocks(xp, out, ell),
            lb,
            _blocks(xp, dout, ell),
            mask=_own_mask(xp, ell, lo, hi, dev),
            scale=scale,
        )[:3]
        return _unblocks(xp, dq), _unsummary(xp, dk, ell, lo, hi), _unsummary(xp, dv, ell, lo, hi)
    # summary_prev
    ell, lo, hi = part[1:]
    n, c = length // ell, hi - lo
    ks, vs = (_unblocks(xp, _summary(xp, a, ell, lo, hi)) for a in (k, v))
    batch = tuple(q.shape[:-2])
    dq_parts = [_zeros(xp, batch + (ell, q.shape[-1]), q)]
    dks, dvs = _zeros(xp, tuple(ks.shape), ks), _zeros(xp, tuple(vs.shape), vs)
    for b in range(1, n):
        sl = slice(b * ell, (b + 1) * ell)
        dq, dk, dv = ops[1](
            xp,
            q[..., sl, :],
            ks[..., : b * c, :],
            vs[..., : b * c, :],
            out[..., sl, :],
            lse[..., sl],
            dout[..., sl, :],
            scale=scale,
        )[:3]
        dq_parts.append(dq)
        dks = dks + _pad_rows(xp, dk, (n - b) * c)
        dvs = dvs + _pad_rows(xp, dv, (n - b) * c)
    unflat = lambda a: xp.reshape(a, batch + (n, c, a.shape[-1]))  # noqa: E731
    return (
        xp.concat(dq_parts, axis=-2),
        _unsummary(xp, unflat(dks), ell, lo, hi),
        _unsummary(xp, unflat(dvs), ell, lo, hi),
    )


# -- one group of heads sharing a pattern -------------------------------------------------------


def _group_forward(xp, parts, q, k, v, scale, ops):
    results = [
        r for r in (_part_forward(xp, p, q, k, v, scale, ops) for p in parts) if r is not None
    ]
    if not results:
        shape = tuple(q.shape[:-1])
        return _zeros(xp, shape + (v.shape[-1],), v), xp.full(
            shape, math.inf, dtype=q.dtype, device=device_of(q)
        )
    # lse = +inf marks an empty row (nothing attended): weight 0 in the merge.
    effs = [xp.where(lse == math.inf, -math.inf, lse) for _, lse in results]
    m = effs[0]
    for e in effs[1:]:
        m = xp.maximum(m, e)
    empty = m == -math.inf
    m_safe = xp.where(empty, 0.0, m)
    total = sum(xp.exp(e - m_safe) for e in effs)
    lse = xp.where(empty, math.inf, m_safe + xp.log(xp.where(empty, 1.0, total)))
    out = sum(xp.exp(e - lse)[..., None] * o for e, (o, _) in zip(effs, results, strict=True))
    return out, lse


def _group_backward(xp, parts, q, k, v, out, lse, dout, scale, ops):
    dq = dk = dv = None
    length = q.shape[-2]
    for p in parts:
        if (p[0] == "residue" and length // p[1] - p[2] <= 0) or (
            p[0] == "summary_prev" and length // p[1] < 2
        ):
            continue  # the part attends to nothing
        g = _part_backward(xp, p, q, k, v, out, lse, dout, scale, ops)
        dq, dk, dv = (g[0], g[1], g[2]) if dq is None else (dq + g[0], dk + g[1], dv + g[2])
    if dq is None:
        dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    return dq, dk, dv


def _groups(heads: list[tuple]) -> list[tuple[tuple, list[int]]]:
    order: dict[tuple, list[int]] = {}
    for h, parts in enumerate(heads):
        order.setdefault(parts, []).append(h)
    return list(order.items())


def _padded_length(length, stride):
    return -(-length // stride) * stride


def _take_heads(xp, x, idx, nheads, axis):
    if len(idx) == nheads:
        return x
    return xp.take(x, xp.asarray(idx, device=device_of(x)), axis=axis)


def _scatter_heads(xp, pieces, groups, axis):
    """Concatenate the groups' results along the head axis and restore the head order."""
    if len(groups) == 1:
        return pieces[0]
    order = [h for _, idx in groups for h in idx]
    inverse = [order.index(h) for h in range(len(order))]
    cat = xp.concat(pieces, axis=axis)
    return xp.take(cat, xp.asarray(inverse, device=device_of(cat)), axis=axis)


#: The dense attention pair the parts run on: the array-API reference by default; a backend
#: passes its own (same signatures) to run the decomposition on its kernels.
REFERENCE_ATTENTION = (sdpa_forward, sdpa_backward)


def sparse_forward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    *,
    heads: list[tuple],
    stride: int,
    scale: float,
    attention=REFERENCE_ATTENTION,
):
    """Returns ``(out, lse)``: out (..., L, dv) in q's dtype, lse (..., L) in the compute dtype
    (``+inf`` for a row that attends to nothing). ``attention`` is the ``(forward, backward)``
    pair of tiled dense attention the parts run on (signatures of ``sdpa_forward`` /
    ``sdpa_backward``)."""
    cdt = compute_dtype(xp, q.dtype)
    length = q.shape[-2]
    pad = _padded_length(length, stride) - length
    qc, kc, vc = (_pad_rows(xp, xp.astype(a, cdt, copy=False), pad) for a in (q, k, v))
    groups = _groups(heads)
    outs, lses = [], []
    for parts, idx in groups:
        take = functools.partial(_take_heads, xp, idx=idx, nheads=len(heads), axis=-3)
        o, lse = _group_forward(xp, parts, take(qc), take(kc), take(vc), scale, attention)
        outs.append(o)
        lses.append(lse)
    out = _scatter_heads(xp, outs, groups, -3)[..., :length, :]
    lse = _scatter_heads(xp, lses, groups, -2)[..., :length]
    return xp.astype(out, q.dtype), lse


def sparse_backward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    *,
    heads: list[tuple],
    stride: int,
    scale: float,
    attention=REFERENCE_ATTENTION,
):
    """Returns ``(dq, dk, dv)`` in the input dtypes."""
    cdt = compute_dtype(xp, q.dtype)
    length = q.shape[-2]
    pad = _padded_length(length, stride) - length
    qc, kc, vc, oc, dc = (
        _pad_rows(xp, xp.astype(a, cdt, copy=False), pad) for a in (q, k, v, out, dout)
    )
    lc = _pad_rows(xp, lse, pad, value=math.inf)  # padded queries attend to nothing
    groups = _groups(heads)
    grads = []
    for parts, idx in groups:
        take = functools.partial(_take_heads, xp, idx=idx, nheads=len(heads), axis=-3)
        lt = _take_heads(xp, lc, idx, len(heads), -2)
        grads.append(
            _group_backward(
                xp, parts, take(qc), take(kc), take(vc), take(oc), lt, take(dc), scale, attention
            )
        )
    dq, dk, dv = (
        _scatter_heads(xp, [g[i] for g in grads], groups, -3)[..., :length, :] for i in range(3)
    )
    return xp.astype(dq, q.dtype), xp.astype(dk, k.dtype), xp.astype(dv, v.dtype)

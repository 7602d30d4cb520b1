"""Numba CPU kernels of windowed local attention (neighbourhood attention 1-D/2-D, HaloNet).

One separable-window kernel serves every op of :mod:`arrayattn.neighborhood`: the windows are the
small ``(K, L)`` index tables of :mod:`arrayattn._reference.neighborhood` and keys are reached by
index arithmetic (no unfolded ``K²``-times copy of keys or values, no dense ``HW×HW`` mask).

* forward: ``prange`` over (batch·heads, query row); per query the ``K²`` logits live in a local
  buffer, softmax, ``out = Σ p v``, the logsumexp is saved.
* backward, pass 1 (same parallel layout): recompute ``P`` from the logsumexp,
  ``dl = P (dout·v - D)``, ``dq``; ``P`` and ``dl`` are stored per (query, slot) (``O(HW·K²)``
  scalars), the bias/relative-table gradients are accumulated per query row and reduced over
  the rows afterwards in a fixed order.
* backward, pass 2: ``prange`` over (batch·heads, key row); each key gathers ``dk``, ``dv`` from
  its inverse neighbourhood (the (query, slot) pairs that read it, a CSR table built from the
  forward tables) — no two threads write the same key, so the result is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel
from arrayattn._reference.neighborhood import inverse_windows
from arrayattn._xp import sum_to_shape

__all__ = ["KERNELS", "window_attention_backward", "window_attention_forward"]

# Reassociation lets LLVM vectorise the d-long dot products; no 'nnan'/'ninf' (masked logits
# are -inf).
_FM = {"reassoc", "contract", "arcp", "nsz"}


@njit(inline="always", cache=True, fastmath=_FM)
def _rel_logits(q, b, i, j, table, rows, pos, zero, out):
    """``out[a] = q[b, i, j] · table[b, rows[a, pos]]``: the relative-position logits of query
    (i, j) for the window slots ``a`` of one axis (``pos`` is its coordinate on that axis)."""
    for a in range(out.shape[0]):
        tot = zero
        row = rows[a, pos]
        for e in range(q.shape[3]):
            tot += q[b, i, j, e] * table[b, row, e]
        out[a] = tot


@njit(parallel=True, cache=True, fastmath=_FM)
def _forward(q, k, v, iy, vy, ry, ix, vx, rx, bias, rh, rw, flags, scale, out, lse):
    nbh, h, w, d = q.shape
    dv = v.shape[3]
    ky_n, kx_n = iy.shape[0], ix.shape[0]
    nslot = ky_n * kx_n
    has_bias, has_rh, has_rw, zero_mode = flags[0], flags[1], flags[2], flags[3]
    for t in prange(nbh * h):
        b = t // h
        i = t - b * h
        s = np.empty(nslot, dtype=q.dtype)
        acc = np.empty(dv, dtype=q.dtype)
        qry = np.zeros(ky_n, dtype=q.dtype)
        qrx = np.zeros(kx_n, dtype=q.dtype)
        for j in range(w):
            if has_rh:
                _rel_logits(q, b, i, j, rh, ry, i, scale - scale, qry)
            if has_rw:
                _rel_logits(q, b, i, j, rw, rx, j, scale - scale, qrx)
            m = -np.inf
            for a in range(ky_n):
                yy = iy[a, i]
                for c in range(kx_n):
                    slot = a * kx_n + c
                    ok = vy[a, i] and vx[c, j]
                    if not ok and not zero_mode:
                        s[slot] = -np.inf
                        continue
                    val = scale - scale
                    if ok:
                        xx = ix[c, j]
                        for e in range(d):
                            val += q[b, i, j, e] * k[b, yy, xx, e]
                        val *= scale
                    val += qry[a] + qrx[c]
                    if has_bias:
                        val += bias[b, ry[a, i], rx[c, j]]
                    s[slot] = val
                    if val > m:
                        m = val
            for e in range(dv):
                acc[e] = 0
            if m == -np.inf:
                for e in range(dv):
                    out[b, i, j, e] = 0
                lse[b, i, j] = np.inf
                continue
            total = scale - scale
            for slot in range(nslot):
                p = math.exp(s[slot] - m)
                s[slot] = p
                total += p
            inv = 1 / total
            for a in range(ky_n):
                yy = iy[a, i]
                for c in range(kx_n):
                    if vy[a, i] and vx[c, j]:
                        p = s[a * kx_n + c] * inv
                        xx = ix[c, j]
                        for e in range(dv):
                            acc[e] += p * v[b, yy, xx, e]
            for e in range(dv):
                out[b, i, j, e] = acc[e]
            lse[b, i, j] = m + math.log(total)


@njit(parallel=True, cache=True, fastmath=_FM)
def _backward_queries(
    q,
    k,
    v,
    out,
    lse,
    dout,
    iy,
    vy,
    ry,
    ix,
    vx,
    rx,
    bias,
    rh,
    rw,
    flags,
    scale,
    dq,
    pst,
    dlst,
    dbias_rows,
    drh_rows,
    drw_rows,
):
    nbh, h, w, d = q.shape
    dv = v.shape[3]
    ky_n, kx_n = iy.shape[0], ix.shape[0]
    has_bias, has_rh, has_rw, zero_mode = flags[0], flags[1], flags[2], flags[3]
    for t in prange(nbh * h):
        b = t // h
        i = t - b * h
        qry = np.zeros(ky_n, dtype=q.dtype)
        qrx = np.zeros(kx_n, dtype=q.dtype)
        sum_a = np.empty(ky_n, dtype=q.dtype)
        sum_c = np.empty(kx_n, dtype=q.dtype)
        g = np.empty(d, dtype=q.dtype)
        for j in range(w):
            if has_rh:
                _rel_logits(q, b, i, j, rh, ry, i, scale - scale, qry)
            if has_rw:
                _rel_logits(q, b, i, j, rw, rx, j, scale - scale, qrx)
            big_d = scale - scale
            for e in range(dv):
                big_d += dout[b, i, j, e] * out[b, i, j, e]
            m = lse[b, i, j]
            for e in range(d):
                g[e] = 0
            for a in range(ky_n):
                sum_a[a] = 0
            for c in range(kx_n):
                sum_c[c] = 0
            for a in range(ky_n):
                yy = iy[a, i]
                for c in range(kx_n):
                    slot = a * kx_n + c
                    ok = vy[a, i] and vx[c, j]
                    if (not ok and not zero_mode) or m == np.inf:
                        pst[b, i, j, slot] = 0
                        dlst[b, i, j, slot] = 0
                        continue
                    xx = ix[c, j]
                    val = scale - scale
                    dp = scale - scale
                    if ok:
                        for e in range(d):
                            val += q[b, i, j, e] * k[b, yy, xx, e]
                        val *= scale
                        for e in range(dv):
                            dp += dout[b, i, j, e] * v[b, yy, xx, e]
                    val += qry[a] + qrx[c]
                    if has_bias:
                        val += bias[b, ry[a, i], rx[c, j]]
                    p = math.exp(val - m)
                    dl = p * (dp - big_d)
                    pst[b, i, j, slot] = p
                    dlst[b, i, j, slot] = dl
                    sum_a[a] += dl
                    sum_c[c] += dl
                    if has_bias:
                        dbias_rows[t, ry[a, i], rx[c, j]] += dl
                    if ok:
                        f = dl * scale
                        for e in range(d):
                            g[e] += f * k[b, yy, xx, e]
            if has_rh:
                for a in range(ky_n):
                    row = ry[a, i]
                    f = sum_a[a]
                    for e in range(d):
                        g[e] += f * rh[b, row, e]
                        drh_rows[t, row, e] += f * q[b, i, j, e]
            if has_rw:
                for c in range(kx_n):
                    row = rx[c, j]
                    f = sum_c[c]
                    for e in range(d):
                        g[e] += f * rw[b, row, e]
                        drw_rows[t, row, e] += f * q[b, i, j, e]
            for e in range(d):
                dq[b, i, j, e] = g[e]


@njit(parallel=True, cache=True, fastmath=_FM)
def _backward_keys(q, dout, pst, dlst, kx_n, ptr_y, qi_y, sl_y, ptr_x, qi_x, sl_x, scale, dk, dv):
    nbh, h, w, d = q.shape
    dvw = dout.shape[3]
    for t in prange(nbh * h):
        b = t // h
        yy = t - b * h
        gk = np.empty(d, dtype=q.dtype)
        gv = np.empty(dvw, dtype=q.dtype)
        for xx in range(w):
            for e in range(d):
                gk[e] = 0
            for e in range(dvw):
                gv[e] = 0
            for u in range(ptr_y[yy], ptr_y[yy + 1]):
                i = qi_y[u]
                a = sl_y[u]
                for z in range(ptr_x[xx], ptr_x[xx + 1]):
                    j = qi_x[z]
                    slot = a * kx_n + sl_x[z]
                    dl = dlst[b, i, j, slot]
                    p = pst[b, i, j, slot]
                    for e in range(d):
                        gk[e] += dl * q[b, i, j, e]
                    for e in range(dvw):
                        gv[e] += p * dout[b, i, j, e]
            for e in range(d):
                dk[b, yy, xx, e] = gk[e] * scale
            for e in range(dvw):
                dv[b, yy, xx, e] = gv[e]


# -- glue ------------------------------------------------------------------------------------------


def _flat(a, dtype):
    """(..., H, W, c) -> contiguous (BH, H, W, c) in dtype."""
    flat = np.ascontiguousarray(a.reshape((-1,) + a.shape[-3:]), dtype=dtype)
    # read-only inputs would compile a second specialisation of every kernel
    return flat if flat.flags.writeable else flat.copy()


def _per_batch(t, batch, tail, dtype):
    """A table broadcastable to batch + tail, materialised as contiguous (BH, *tail)."""
    if t is None:
        return np.zeros((1,) * (1 + len(tail)), dtype=dtype)
    full = np.broadcast_to(t, tuple(batch) + tuple(tail))
    return np.ascontiguousarray(full.reshape((-1,) + tuple(tail)), dtype=dtype)


def _tables(win):
    return (
        np.ascontiguousarray(win.idx),
        np.ascontiguousarray(win.valid),
        np.ascontiguousarray(win.rel),
    )


def _prepare(q, v, wy, wx, boundary, rel_bias, r_h, r_w):
    """Flags and per-batch tables of a call on the (..., H, W, ·) layout."""
    dtype = q.dtype
    batch = q.shape[:-3]
    d = q.shape[-1]
    flags = np.array(
        [rel_bias is not None, r_h is not None, r_w is not None, boundary == "zero"],
        dtype=np.bool_,
    )
    tabs = dict(
        bias=_per_batch(rel_bias, batch, (wy.table, wx.table), dtype),
        rh=_per_batch(r_h, batch, (wy.table, d), dtype),
        rw=_per_batch(r_w, batch, (wx.table, d), dtype),
    )
    return batch, flags, tabs


def window_attention_forward(
    q, k, v, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None, block=None
):
    """``(out, lse)`` like the reference ``window_attention_forward`` (float32/float64)."""
    batch, flags, tabs = _prepare(q, v, wy, wx, boundary, rel_bias, r_h, r_w)
    dtype = q.dtype
    qf, kf, vf = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    out = np.empty(vf.shape, dtype=dtype)
    lse = np.empty(qf.shape[:-1], dtype=dtype)
    _forward(
        qf, kf, vf, *_tables(wy), *_tables(wx), tabs["bias"], tabs["rh"], tabs["rw"], flags,
        dtype.type(scale), out, lse,
    )  # fmt: skip
    return out.reshape(tuple(batch) + out.shape[1:]), lse.reshape(tuple(batch) + lse.shape[1:])


def window_attention_backward(
    q, k, v, out, lse, dout, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None,
    block=None,
):  # fmt: skip
    """``(dq, dk, dv, drel_bias, dr_h, dr_w)`` like the reference ``window_attention_backward``."""
    batch, flags, tabs = _prepare(q, v, wy, wx, boundary, rel_bias, r_h, r_w)
    dtype = q.dtype
    qf, kf, vf = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    of, dof = _flat(out, dtype), _flat(dout, dtype)
    lse = np.ascontiguousarray(lse.reshape(qf.shape[:-1]), dtype=dtype)
    nbh, h, w, d = qf.shape
    nslot = wy.idx.shape[0] * wx.idx.shape[0]
    dq = np.empty_like(qf)
    pst = np.empty((nbh, h, w, nslot), dtype=dtype)
    dlst = np.empty((nbh, h, w, nslot), dtype=dtype)
    has_bias, has_rh, has_rw = bool(flags[0]), bool(flags[1]), bool(flags[2])
    rows = nbh * h
    dbias_rows = np.zeros((rows, wy.table, wx.table) if has_bias else (1, 1, 1), dtype=dtype)
    drh_rows = np.zeros((rows, wy.table, d) if has_rh else (1, 1, 1), dtype=dtype)
    drw_rows = np.zeros((rows, wx.table, d) if has_rw else (1, 1, 1), dtype=dtype)
    scale = dtype.type(scale)
    _backward_queries(
        qf, kf, vf, of, lse, dof, *_tables(wy), *_tables(wx), tabs["bias"], tabs["rh"],
        tabs["rw"], flags, scale, dq, pst, dlst, dbias_rows, drh_rows, drw_rows,
    )  # fmt: skip
    dk = np.empty_like(kf)
    dv = np.empty_like(vf)
    _backward_keys(
        qf, dof, pst, dlst, wx.idx.shape[0], *inverse_windows(wy), *inverse_windows(wx), scale,
        dk, dv,
    )  # fmt: skip
    lead = tuple(batch)

    def reduce(rows_arr, tail, like):
        per = rows_arr.reshape((nbh, h) + tail).sum(axis=1).reshape(lead + tail)
        return sum_to_shape(np, per, like.shape).astype(like.dtype, copy=False)

    dbias = reduce(dbias_rows, (wy.table, wx.table), rel_bias) if has_bias else None
    drh = reduce(drh_rows, (wy.table, d), r_h) if has_rh else None
    drw = reduce(drw_rows, (wx.table, d), r_w) if has_rw else None
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dbias, drh, drw


# The kernels run in the window convention of arrayattn._glue.neighborhood (the op adapts them);
# halo_attention has a block-by-block kernel of its own (halo.py).
_KERNEL = Kernel(window_attention_forward, window_attention_backward)

KERNELS = {
    "neighborhood_attention_2d": _KERNEL,
    "neighborhood_attention_1d": _KERNEL,
}

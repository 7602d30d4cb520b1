"""Numba kernels of criss-cross attention (CCNet).

Every pass is split by the axis it runs along, so that each parallel task owns what it writes and
keeps its operands in cache:

forward
    *rows* (one task per image row ``(b, y)``): the ``W`` row logits and ``H`` column logits of
    each pixel (the self slot of the column part at ``-inf``), one softmax over both, kept as the
    ``(B, H, W, W + H)`` probability map ``p`` (the size of CCNet's own attention map; slot
    ``x'`` = row key ``(y, x')``, slot ``W + y'`` = column key ``(y', x)``), and the row part of
    the output; *columns* (one task per ``(b, x)``): the column part of the output, added.
backward
    *rows*: ``D = dO·O``, then for the row keys ``ds = p (dO·v - D)``, ``dq += ds k``, and the
    row key's ``dk += ds q``, ``dv += p dO`` — all those keys lie in the task's own row;
    *columns*: the same for the column keys, which lie in the task's own column. The ``dq``/``dk``
    products run over the keys (transposed key layout, a per-task transposed ``dk`` buffer) so
    that they vectorize.

No scatter crosses tasks and no atomics are used: results are bitwise reproducible. The residuals
are ``q, k, v``, the output and the per-pixel logsumexp ``lse`` (as every backend saves them:
O(HW), not the O(HW(H + W)) map); backward recomputes ``p = exp(s - lse)`` with the forward's
logits pass, then runs the passes above.

Two implementations of these passes, the same split and the same ownership:

GEMM path (``USE_BLAS``, the default where NumPy's OpenBLAS is found)
    every product is a strided single-threaded BLAS GEMM (``_blas.gemm`` inside
    ``_blas.single_threaded_blas``) read straight from the ``(B, H, W, c)`` arrays — a row
    is a ``(W, c)`` block, a column an ``(H, c)`` block with leading dimension ``W·c``, so the
    column pass needs no transposed copy: forward = column logits ``Q_col K_colᵀ`` (one pass),
    then per row the row logits ``Q_row K_rowᵀ``, the softmax over the ``W + H`` slots and
    ``O_row = P_row V_row``, then per column ``O_col += P_col V_col``; backward per row
    ``dP = dO V_rowᵀ``, ``ds = P (dP - D)``, ``dq = ds K``, ``dk = dsᵀ Q``, ``dv = Pᵀ dO``
    (written), per column the same (added). The logits are carried in base 2 (``scale·log2 e``
    folded into the GEMM) so that the softmax uses the vectorizable ``_exp.exp2``/``row_max`` in
    float32 and float64 alike. Only a ``(W, W)`` / ``(H, H)`` ``ds`` tile per task
    is allocated. The summation order is fixed by the shapes, so results stay reproducible.
loop path (no BLAS)
    the loop kernels below (``_fwd_rows`` ...), vectorized over the keys.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel

from ._blas import HAS_BLAS, gemm, single_threaded_blas
from ._exp import LOG2E, exp2, row_max

__all__ = ["KERNELS", "criss_cross_backward", "criss_cross_forward"]

#: Run the products as single-threaded BLAS GEMMs (NumPy's OpenBLAS, through ``_blas.gemm``);
#: False (or no BLAS found) selects the loop kernels. A module attribute so tests cover both paths.
USE_BLAS = HAS_BLAS

# fast-math without "no NaNs / no infs" (the running maximum starts at -inf)
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n·LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.4286068203094173e-06


@njit(cache=True, fastmath=_FM, inline="always")
def _softmax_fast32(px, bits, m, nk):
    """px[:nk] <- exp(px - m) for float32, vectorizable: Cody-Waite reduction, degree-6
    polynomial (relative error ~1e-7, about an ulp), 2^n built in the exponent bits; arguments
    below -87 (including the -inf self slot) give exactly 0. Returns the sum."""
    scaled = bits.view(np.float32)
    for n in range(nk):
        x = max(px[n] - m, np.float32(-87.0))
        fn = math.floor(x * np.float32(_LOG2E) + np.float32(0.5))
        r = x - fn * np.float32(_LN2_HI) - fn * np.float32(_LN2_LO)
        poly = np.float32(1.0) + r * (
            np.float32(1.0)
            + r
            * (
                np.float32(0.5)
                + r
                * (
                    np.float32(1 / 6)
                    + r * (np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720)))
                )
            )
        )
        bits[n] = (np.int32(fn) + np.int32(127)) << np.int32(23)
        px[n] = poly if px[n] - m > np.float32(-87.0) else np.float32(0.0)
    total = np.float32(0.0)
    for n in range(nk):
        e = px[n] * scaled[n]
        px[n] = e
        total += e
    return total


@njit(cache=True, fastmath=_FM, inline="always")
def _pixel_logits(qx, kr, kc, scale, px, w, h, y):
    """The ``W + H`` logits of pixel ``(y, ·)`` into ``px`` (the self slot of the column part at
    ``-inf``); returns their maximum."""
    nk = w + h
    for n in range(nk):
        px[n] = 0
    for c in range(qx.shape[0]):
        qc = qx[c] * scale
        for x2 in range(w):
            px[x2] += qc * kr[c, x2]
        for y2 in range(h):
            px[w + y2] += qc * kc[c, y2]
    m = -np.inf
    for n in range(w):
        m = max(m, px[n])
    for y2 in range(h):
        if y2 != y:
            m = max(m, px[w + y2])
    px[w + y] = -np.inf  # the self key is counted once, in the row part
    return m


@njit(cache=True, fastmath=_FM, inline="always")
def _exp_shifted(px, bits, shift, nk, fast):
    """px[:nk] <- exp(px - shift); returns the sum."""
    if fast:
        return _softmax_fast32(px, bits, shift, nk)
    ell = px.dtype.type(0.0)
    for n in range(nk):
        e = math.exp(px[n] - shift)
        px[n] = e
        ell += e
    return ell


@njit(parallel=True, cache=True, fastmath=_FM)
def _p_rows(q, k_rows, k_cols, scale, lse, p, fast):
    # backward's probabilities from the saved logsumexp: p = exp(s - lse)
    nb, h, w, _ = q.shape
    nk = w + h
    for t in prange(nb * h):
        b = t // h
        y = t % h
        bits = np.empty(nk, dtype=np.int32)
        for x in range(w):
            px = p[b, y, x]
            _pixel_logits(q[b, y, x], k_rows[b, y], k_cols[b, x], scale, px, w, h, y)
            _exp_shifted(px, bits, lse[b, y, x], nk, fast)


@njit(parallel=True, cache=True, fastmath=_FM)
def _fwd_rows(q, k_rows, k_cols, v, scale, out, p, lse, fast):
    # k_rows (B, H, dk, W) and k_cols (B, W, dk, H): keys transposed so that the logits are
    # accumulated over the keys (vectorized) one feature at a time
    nb, h, w, _ = q.shape
    dv = v.shape[3]
    nk = w + h
    for t in prange(nb * h):
        b = t // h
        y = t % h
        bits = np.empty(nk, dtype=np.int32)
        kr = k_rows[b, y]
        for x in range(w):
            px = p[b, y, x]
            m = _pixel_logits(q[b, y, x], kr, k_cols[b, x], scale, px, w, h, y)
            ell = _exp_shifted(px, bits, m, nk, fast)
            lse[b, y, x] = m + math.log(ell)
            inv = 1 / ell
            for n in range(nk):
                px[n] *= inv
            o = out[b, y, x]
            for c in range(dv):
                o[c] = 0
            for x2 in range(w):
                e = px[x2]
                vv = v[b, y, x2]
                for c in range(dv):
                    o[c] += e * vv[c]


@njit(parallel=True, cache=True, fastmath=_FM)
def _fwd_cols(v, p, out):
    nb, h, w, dv = v.shape
    for t in prange(nb * w):
        b = t // w
        x = t % w
        for y in range(h):
            o = out[b, y, x]
            px = p[b, y, x]
            for y2 in range(h):
                e = px[w + y2]  # 0 for y2 == y
                vv = v[b, y2, x]
                for c in range(dv):
                    o[c] += e * vv[c]


@njit(parallel=True, cache=True, fastmath=_FM)
def _bwd_rows(q, k_rows, v, out, p, dout, scale, dq, dk, dv, delta):
    nb, h, w, nd = q.shape
    nv = v.shape[3]
    for t in prange(nb * h):
        b = t // h
        y = t % h
        kr = k_rows[b, y]  # (dk, W)
        dkt = np.zeros((nd, w), dtype=q.dtype)  # dk of the row's keys, transposed
        ds = np.empty(w, dtype=q.dtype)
        for x in range(w):
            for c in range(nv):
                dv[b, y, x, c] = 0
        for x in range(w):
            do = dout[b, y, x]
            ox = out[b, y, x]
            dd = q.dtype.type(0.0)
            for c in range(nv):
                dd += do[c] * ox[c]
            delta[b, y, x] = dd
            px = p[b, y, x]
            for x2 in range(w):
                vv = v[b, y, x2]
                dp = q.dtype.type(0.0)
                for c in range(nv):
                    dp += do[c] * vv[c]
                ds[x2] = px[x2] * (dp - dd) * scale
            qx = q[b, y, x]
            for c in range(nd):
                acc = q.dtype.type(0.0)
                qc = qx[c]
                for x2 in range(w):
                    acc += ds[x2] * kr[c, x2]
                    dkt[c, x2] += ds[x2] * qc
                dq[b, y, x, c] = acc
            for x2 in range(w):
                pe = px[x2]
                dvv = dv[b, y, x2]
                for c in range(nv):
                    dvv[c] += pe * do[c]
        for x2 in range(w):
            for c in range(nd):
                dk[b, y, x2, c] = dkt[c, x2]


@njit(parallel=True, cache=True, fastmath=_FM)
def _bwd_cols(q, k_cols, v, p, dout, delta, scale, dq, dk, dv):
    nb, h, w, nd = q.shape
    nv = v.shape[3]
    for t in prange(nb * w):
        b = t // w
        x = t % w
        kc = k_cols[b, x]  # (dk, H)
        dkt = np.zeros((nd, h), dtype=q.dtype)
        ds = np.empty(h, dtype=q.dtype)
        for y in range(h):
            do = dout[b, y, x]
            dd = delta[b, y, x]
            px = p[b, y, x]
            for y2 in range(h):
                vv = v[b, y2, x]
                dp = q.dtype.type(0.0)
                for c in range(nv):
                    dp += do[c] * vv[c]
                ds[y2] = px[w + y2] * (dp - dd) * scale  # p = 0 on the self slot
            qx = q[b, y, x]
            for c in range(nd):
                acc = q.dtype.type(0.0)
                qc = qx[c]
                for y2 in range(h):
                    acc += ds[y2] * kc[c, y2]
                    dkt[c, y2] += ds[y2] * qc
                dq[b, y, x, c] += acc
            for y2 in range(h):
                pe = px[w + y2]
                dvv = dv[b, y2, x]
                for c in range(nv):
                    dvv[c] += pe * do[c]
        for y2 in range(h):
            for c in range(nd):
                dk[b, y2, x, c] += dkt[c, y2]


# -- GEMM path -------------------------------------------------------------------------------------
# Every product is a strided row-major GEMM on the (B, H, W, c) arrays: a row (b, y) is a
# (W, c) block with leading dimension c, a column (b, x) an (H, c) block with leading dimension
# W·c; in p the row part of a row is (W, W) with ld W + H, the column part of a column (H, H) at
# offset W with ld W·(W + H).


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_fwd_col_logits(q, k, scale, p):
    nb, h, w, nd = q.shape
    nk = w + h
    for t in prange(nb * w):
        b = t // w
        x = t % w
        off = b * h * w + x
        gemm(
            False,
            True,
            h,
            h,
            nd,
            scale,
            q,
            off * nd,
            w * nd,
            k,
            off * nd,
            w * nd,
            0.0,
            p,
            off * nk + w,
            w * nk,
        )


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_p_rows(q, k, scale2, lse2, p):
    # backward's probabilities from the saved base-2 logsumexp: p = exp2(s2 - lse2) (the column
    # logits were written by _gemm_fwd_col_logits)
    nb, h, w, nd = q.shape
    nk = w + h
    ninf = q.dtype.type(-np.inf)
    for t in prange(nb * h):
        b = t // h
        y = t % h
        base = (b * h + y) * w
        gemm(
            False, True, w, w, nd, scale2, q, base * nd, nd, k, base * nd, nd, 0.0, p, base * nk, nk
        )
        for x in range(w):
            px = p[b, y, x]
            px[w + y] = ninf
            shift = lse2[b, y, x]
            for n in range(nk):
                px[n] = exp2(px[n] - shift)


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_fwd_rows(q, k, v, scale2, out, p, lse2):
    # the logits are carried in base 2 (scale2 = scale·log2 e; the column part was written so by
    # _gemm_fwd_col_logits): p = exp2(s2 - max) / sum, with the vectorizable exp2 and row_max
    nb, h, w, nd = q.shape
    dv = v.shape[3]
    nk = w + h
    ninf = q.dtype.type(-np.inf)
    one = q.dtype.type(1.0)
    for t in prange(nb * h):
        b = t // h
        y = t % h
        base = (b * h + y) * w
        gemm(
            False, True, w, w, nd, scale2, q, base * nd, nd, k, base * nd, nd, 0.0, p, base * nk, nk
        )
        for x in range(w):
            px = p[b, y, x]
            px[w + y] = ninf  # the self key is counted once, in the row part
            m = row_max(px, nk, ninf)
            ell = q.dtype.type(0.0)
            for n in range(nk):
                e = exp2(px[n] - m)  # exactly 0 for the -inf self slot
                px[n] = e
                ell += e
            lse2[b, y, x] = m + math.log2(ell)
            inv = one / ell
            for n in range(nk):
                px[n] *= inv
        gemm(
            False, False, w, dv, w, 1.0, p, base * nk, nk, v, base * dv, dv, 0.0, out, base * dv, dv
        )


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_fwd_cols(v, p, out):
    nb, h, w, dv = v.shape
    nk = w + h
    for t in prange(nb * w):
        b = t // w
        x = t % w
        off = b * h * w + x
        gemm(
            False,
            False,
            h,
            dv,
            h,
            1.0,
            p,
            off * nk + w,
            w * nk,
            v,
            off * dv,
            w * dv,
            1.0,
            out,
            off * dv,
            w * dv,
        )


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_bwd_rows(q, k, v, out, p, dout, scale, dq, dk, dv, delta):
    nb, h, w, nd = q.shape
    nv = v.shape[3]
    nk = w + h
    for t in prange(nb * h):
        b = t // h
        y = t % h
        base = (b * h + y) * w
        ds = np.empty((w, w), dtype=q.dtype)
        gemm(False, True, w, w, nv, 1.0, dout, base * nv, nv, v, base * nv, nv, 0.0, ds, 0, w)
        for x in range(w):
            do = dout[b, y, x]
            ox = out[b, y, x]
            dd = q.dtype.type(0.0)
            for c in range(nv):
                dd += do[c] * ox[c]
            delta[b, y, x] = dd
            px = p[b, y, x]
            dsx = ds[x]
            for x2 in range(w):
                dsx[x2] = px[x2] * (dsx[x2] - dd) * scale
        gemm(False, False, w, nd, w, 1.0, ds, 0, w, k, base * nd, nd, 0.0, dq, base * nd, nd)
        gemm(True, False, w, nd, w, 1.0, ds, 0, w, q, base * nd, nd, 0.0, dk, base * nd, nd)
        gemm(
            True,
            False,
            w,
            nv,
            w,
            1.0,
            p,
            base * nk,
            nk,
            dout,
            base * nv,
            nv,
            0.0,
            dv,
            base * nv,
            nv,
        )


@njit(parallel=True, cache=True, fastmath=_FM)
def _gemm_bwd_cols(q, k, v, p, dout, delta, scale, dq, dk, dv):
    nb, h, w, nd = q.shape
    nv = v.shape[3]
    nk = w + h
    for t in prange(nb * w):
        b = t // w
        x = t % w
        off = b * h * w + x
        ds = np.empty((h, h), dtype=q.dtype)
        gemm(False, True, h, h, nv, 1.0, dout, off * nv, w * nv, v, off * nv, w * nv, 0.0, ds, 0, h)
        for y in range(h):
            dd = delta[b, y, x]
            px = p[b, y, x]
            dsy = ds[y]
            for y2 in range(h):
                dsy[y2] = px[w + y2] * (dsy[y2] - dd) * scale  # p = 0 on the self slot
        gemm(False, False, h, nd, h, 1.0, ds, 0, h, k, off * nd, w * nd, 1.0, dq, off * nd, w * nd)
        gemm(True, False, h, nd, h, 1.0, ds, 0, h, q, off * nd, w * nd, 1.0, dk, off * nd, w * nd)
        gemm(
            True,
            False,
            h,
            nv,
            h,
            1.0,
            p,
            off * nk + w,
            w * nk,
            dout,
            off * nv,
            w * nv,
            1.0,
            dv,
            off * nv,
            w * nv,
        )


def _flat(a):
    """(..., H, W, c) -> contiguous (B, H, W, c)."""
    # An explicit batch size: reshape cannot infer -1 when a trailing axis is empty (dk = 0).
    return np.ascontiguousarray(a.reshape((math.prod(a.shape[:-3]),) + a.shape[-3:]))


def criss_cross_forward(q, k, v, *, scale):
    """``(out, lse)`` like the reference's, for float32/float64 NumPy arrays."""
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    nb, h, w, _ = qf.shape
    use_gemm = bool(nb and h and w and USE_BLAS)  # every output element is written with beta = 0
    out = (np.empty if use_gemm else np.zeros)(vf.shape, dtype=q.dtype)
    lse = np.full((nb, h, w), np.inf, dtype=q.dtype)  # +inf: no key (only where H = W = 0)
    p = np.empty((nb, h, w, w + h), dtype=q.dtype)
    if use_gemm:
        scale2 = q.dtype.type(scale * LOG2E)  # base-2 logits
        with single_threaded_blas():
            _gemm_fwd_col_logits(qf, kf, scale2, p)
            _gemm_fwd_rows(qf, kf, vf, scale2, out, p, lse)
            _gemm_fwd_cols(vf, p, out)
        lse /= q.dtype.type(LOG2E)  # base 2 -> natural
    elif nb and h and w:
        # float32: the vectorizable exponential (numba's exp is a scalar libm call here)
        k_rows = np.ascontiguousarray(kf.transpose(0, 1, 3, 2))
        k_cols = np.ascontiguousarray(kf.transpose(0, 2, 3, 1))
        _fwd_rows(qf, k_rows, k_cols, vf, q.dtype.type(scale), out, p, lse, q.dtype == np.float32)
        if vf.shape[3]:
            _fwd_cols(vf, p, out)
    return out.reshape(v.shape), lse.reshape(q.shape[:-1])


def criss_cross_backward(q, k, v, out, lse, dout, *, scale):
    """``(dq, dk, dv)`` like the reference's; the probabilities are recomputed from ``lse``."""
    qf, kf, vf, of = (_flat(a) for a in (q, k, v, out))
    df = _flat(np.asarray(dout, dtype=q.dtype))
    nb, h, w, _ = qf.shape
    lse3 = np.ascontiguousarray(lse, dtype=q.dtype).reshape((nb, h, w))
    use_gemm = bool(nb and h and w and USE_BLAS)  # the rows pass writes dq, dk, dv with beta = 0
    alloc = np.empty if use_gemm else np.zeros
    dq, dk, dv = alloc(qf.shape, q.dtype), alloc(qf.shape, q.dtype), alloc(vf.shape, q.dtype)
    p = np.empty((nb, h, w, w + h), dtype=q.dtype)
    scale_t = q.dtype.type(scale)
    if use_gemm:
        scale2 = q.dtype.type(scale * LOG2E)
        delta = np.empty((nb, h, w), dtype=q.dtype)
        with single_threaded_blas():
            _gemm_fwd_col_logits(qf, kf, scale2, p)
            _gemm_p_rows(qf, kf, scale2, lse3 * q.dtype.type(LOG2E), p)
            _gemm_bwd_rows(qf, kf, vf, of, p, df, scale_t, dq, dk, dv, delta)
            _gemm_bwd_cols(qf, kf, vf, p, df, delta, scale_t, dq, dk, dv)
    elif nb and h and w:
        delta = np.empty((nb, h, w), dtype=q.dtype)
        k_rows = np.ascontiguousarray(kf.transpose(0, 1, 3, 2))
        k_cols = np.ascontiguousarray(kf.transpose(0, 2, 3, 1))
        _p_rows(qf, k_rows, k_cols, scale_t, lse3, p, q.dtype == np.float32)
        _bwd_rows(qf, k_rows, vf, of, p, df, scale_t, dq, dk, dv, delta)
        _bwd_cols(qf, k_cols, vf, p, df, delta, scale_t, dq, dk, dv)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# The kernel runs in the criss-cross convention of arrayattn._glue.criss_cross (the op adapts it).
KERNELS = {"criss_cross_attention": Kernel(criss_cross_forward, criss_cross_backward)}

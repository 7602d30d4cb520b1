"""Numba kernels of criss-cross attention (CCNet, spec section 5).

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
are ``q, k, v``, the output and ``p`` (the backward pass needs no exponential).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._op import Kernel

__all__ = ["KERNELS"]

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
        poly = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
            np.float32(1 / 6) + r * (np.float32(1 / 24) + r * (
                np.float32(1 / 120) + r * np.float32(1 / 720))))))
        bits[n] = (np.int32(fn) + np.int32(127)) << np.int32(23)
        px[n] = poly if px[n] - m > np.float32(-87.0) else np.float32(0.0)
    total = np.float32(0.0)
    for n in range(nk):
        e = px[n] * scaled[n]
        px[n] = e
        total += e
    return total


@njit(parallel=True, cache=True, fastmath=_FM)
def _fwd_rows(q, k_rows, k_cols, v, scale, out, p, fast):
    # k_rows (B, H, dk, W) and k_cols (B, W, dk, H): keys transposed so that the logits are
    # accumulated over the keys (vectorized) one feature at a time
    nb, h, w, dk = q.shape
    dv = v.shape[3]
    nk = w + h
    for t in prange(nb * h):
        b = t // h
        y = t % h
        bits = np.empty(nk, dtype=np.int32)
        kr = k_rows[b, y]
        for x in range(w):
            qx = q[b, y, x]
            px = p[b, y, x]
            kc = k_cols[b, x]
            for n in range(nk):
                px[n] = 0
            for c in range(dk):
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
            if fast:
                l = _softmax_fast32(px, bits, m, nk)
            else:
                l = q.dtype.type(0.0)
                for n in range(nk):
                    e = math.exp(px[n] - m)
                    px[n] = e
                    l += e
            inv = 1 / l
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


def _flat(a):
    """(..., H, W, c) -> contiguous (B, H, W, c)."""
    return np.ascontiguousarray(a.reshape((-1,) + a.shape[-3:]))


def _fwd_kernel(xp, arrays, static, save):
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    nb, h, w, _ = qf.shape
    out = np.zeros(vf.shape, dtype=q.dtype)
    p = np.empty((nb, h, w, w + h), dtype=q.dtype)
    if nb and h and w:
        # float32: the vectorizable exponential (numba's exp is a scalar libm call here)
        k_rows = np.ascontiguousarray(kf.transpose(0, 1, 3, 2))
        k_cols = np.ascontiguousarray(kf.transpose(0, 2, 3, 1))
        _fwd_rows(qf, k_rows, k_cols, vf, q.dtype.type(static["scale"]), out, p,
                  q.dtype == np.float32)
        if vf.shape[3]:
            _fwd_cols(vf, p, out)
    out = out.reshape(v.shape)
    saved = {"q": q, "k": k, "v": v, "out": out, "p": p} if save else {}
    return (out,), saved


def _bwd_kernel(xp, saved, static, cotangents):
    q, k, v, out, p = (saved[n] for n in ("q", "k", "v", "out", "p"))
    (dout,) = cotangents
    qf, kf, vf, of, df = (_flat(a) for a in (q, k, v, out, dout))
    nb, h, w, _ = qf.shape
    scale = q.dtype.type(static["scale"])
    dq, dk = np.zeros(qf.shape, q.dtype), np.zeros(qf.shape, q.dtype)
    dv = np.zeros(vf.shape, q.dtype)
    if nb and h and w:
        delta = np.empty((nb, h, w), dtype=q.dtype)
        k_rows = np.ascontiguousarray(kf.transpose(0, 1, 3, 2))
        k_cols = np.ascontiguousarray(kf.transpose(0, 2, 3, 1))
        _bwd_rows(qf, k_rows, vf, of, p, df, scale, dq, dk, dv, delta)
        _bwd_cols(qf, k_cols, vf, p, df, delta, scale, dq, dk, dv)
    return {"q": dq.reshape(q.shape), "k": dk.reshape(k.shape), "v": dv.reshape(v.shape)}


def _supports(call):
    q = call.arrays["q"]
    if q.dtype not in (np.float32, np.float64):
        return f"takes float32 or float64, got {q.dtype}"
    return None


KERNELS = {
    "criss_cross_attention": Kernel(_fwd_kernel, _bwd_kernel, _supports),
}

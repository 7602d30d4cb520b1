"""Numba kernels of the squeeze-and-excitation and CBAM blocks.

Both blocks are memory-bound and their gates are per sample: everything one batch element needs
(the pools of its C planes, the excitation MLP, CBAM's channel pools and k×k spatial conv, and the
gated output) depends only on that element's ``x[n]`` (C·H·W values, 0.8 MB at C=256, 28×28
float32: it stays in the L2 cache). So each kernel is one ``prange`` over the batch whose body
runs every pass of the block on ``x[n]`` back to back: one trip to memory for ``x`` (and ``dy``)
instead of one per elementwise step. The MLP runs as loops in the body (a (Cr, C) mat-vec); the
weight gradients are products of the (N, C)/(N, Cr) per-sample vectors the kernels write out,
done in NumPy afterwards (fixed order: deterministic, no races). CBAM's per-plane first maxima
come from NumPy's SIMD ``argmax`` before the kernel (3× faster than a branchy scalar scan, and the
reference's tie and NaN rule by construction). Calls with fewer than ``PARALLEL_MIN_WORK``
elements, or a single sample, run the serial twin (a single sample is not split further).

Semantics follow :mod:`arrayattn._reference.channel` (same ``saved`` keys): max pools take (and
route gradients to) the first maximum, a NaN counts as the maximum (as ``max``/``argmax``), ReLU's
subgradient at 0 is 0, the sigmoid is the overflow-free ``exp(-|a|)`` form. Arithmetic runs in the
input dtype (float32 or float64); other dtypes are left to ``array_api``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel

from ._blas import single_threaded_blas

__all__ = ["KERNELS", "PARALLEL_MIN_WORK"]

# Reassociation (vectorized sums) and FMA contraction only: neither changes NaN/inf propagation.
_FAST = {"reassoc", "contract"}

#: Calls with fewer elements than this (N·C·H·W) run the serial twin of a kernel. These blocks are
#: memory-bound and each pass is short, so the parallel twin mostly waits for its threads: at
#: (32, 256, 28, 28) it measured a steady 9 ms serial against 5 or 60 ms (varying from process to
#: process) on two threads, so only inputs ten times larger go parallel.
PARALLEL_MIN_WORK = 1 << 26


# -- shared pieces ---------------------------------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _sigmoid(a, zero, one):
    e = math.exp(-abs(a))
    return one / (one + e) if a >= zero else e / (one + e)


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _mlp_fwd(zr, w1, b1, w2, b2, zero, hr, ar, accumulate):
    """``hr = relu(w1 zr + b1)``; ``ar (+)= w2 hr + b2``."""
    cr, c = w1.shape
    for j in range(cr):
        acc = zero
        wj = w1[j]
        for i in range(c):
            acc += wj[i] * zr[i]
        acc += b1[j]
        hr[j] = acc if acc > zero else zero
    for i in range(c):
        acc = zero
        wi = w2[i]
        for j in range(cr):
            acc += wi[j] * hr[j]
        acc += b2[i]
        if accumulate:
            ar[i] += acc
        else:
            ar[i] = acc


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _mlp_bwd(da, hr, w1, w2, zero, dpre, dz):
    """``dpre = 1[hr > 0] ⊙ (w2ᵀ da)``, ``dz = w1ᵀ dpre``."""
    cr, c = w1.shape
    for j in range(cr):
        acc = zero
        for i in range(c):
            acc += w2[i, j] * da[i]
        dpre[j] = acc if hr[j] > zero else zero
    for i in range(c):
        dz[i] = zero
    for j in range(cr):
        wj = w1[j]
        d = dpre[j]
        for i in range(c):
            dz[i] += wj[i] * d


# -- squeeze-and-excitation ------------------------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _se_fwd_item(x, w1, b1, w2, b2, zero, one, z, h, s, y, n):
    c, hw = x.shape[1], x.shape[2]
    fhw = zero + hw
    for ch in range(c):
        row = x[n, ch]
        acc = zero
        for p in range(hw):
            acc += row[p]
        z[n, ch] = acc / fhw
    _mlp_fwd(z[n], w1, b1, w2, b2, zero, h[n], s[n], False)
    for ch in range(c):
        g = _sigmoid(s[n, ch], zero, one)
        s[n, ch] = g
        row, out = x[n, ch], y[n, ch]
        for p in range(hw):
            out[p] = row[p] * g


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _se_fwd_par(x, w1, b1, w2, b2, zero, one, z, h, s, y):
    for n in prange(x.shape[0]):
        _se_fwd_item(x, w1, b1, w2, b2, zero, one, z, h, s, y, n)


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _se_fwd_ser(x, w1, b1, w2, b2, zero, one, z, h, s, y):
    for n in range(x.shape[0]):
        _se_fwd_item(x, w1, b1, w2, b2, zero, one, z, h, s, y, n)


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _se_bwd_item(x, dy, s, h, w1, w2, zero, one, da, dpre, dz, dx, n):
    c, hw = x.shape[1], x.shape[2]
    fhw = zero + hw
    for ch in range(c):
        xr, gr = x[n, ch], dy[n, ch]
        acc = zero
        for p in range(hw):
            acc += gr[p] * xr[p]
        g = s[n, ch]
        da[n, ch] = acc * g * (one - g)
    _mlp_bwd(da[n], h[n], w1, w2, zero, dpre[n], dz[n])
    for ch in range(c):
        g = s[n, ch]
        d = dz[n, ch] / fhw
        gr, out = dy[n, ch], dx[n, ch]
        for p in range(hw):
            out[p] = gr[p] * g + d


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _se_bwd_par(x, dy, s, h, w1, w2, zero, one, da, dpre, dz, dx):
    for n in prange(x.shape[0]):
        _se_bwd_item(x, dy, s, h, w1, w2, zero, one, da, dpre, dz, dx, n)


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _se_bwd_ser(x, dy, s, h, w1, w2, zero, one, da, dpre, dz, dx):
    for n in range(x.shape[0]):
        _se_bwd_item(x, dy, s, h, w1, w2, zero, one, da, dpre, dz, dx, n)


# -- CBAM ------------------------------------------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _cbam_fwd_item(
    x, w1, b1, w2, b2, ws, bs, i_avg, zero, one, avg, mx, h_avg, h_max, mc, pooled, arg_c, ms, y, n
):
    c, hgt, wid = x.shape[1], x.shape[2], x.shape[3]
    hw = hgt * wid
    k = ws.shape[-1]
    r = k // 2
    i_max = 1 - i_avg
    fhw, fc = zero + hw, zero + c
    xn = x[n].reshape((c, hw))
    # per-plane mean (the first maxima ``mx``, ``arg_hw`` come in from NumPy's SIMD argmax)
    for ch in range(c):
        row = xn[ch]
        acc = zero
        for p in range(hw):
            acc += row[p]
        avg[n, ch] = acc / fhw
    # channel gate
    _mlp_fwd(avg[n], w1, b1, w2, b2, zero, h_avg[n], mc[n], False)
    _mlp_fwd(mx[n], w1, b1, w2, b2, zero, h_max[n], mc[n], True)
    for ch in range(c):
        mc[n, ch] = _sigmoid(mc[n, ch], zero, one)
    # channel pools of F' = mc ⊙ x (first maximum over channels; a NaN wins)
    csum = pooled[n, i_avg].reshape(hw)
    cmax = pooled[n, i_max].reshape(hw)
    carg = arg_c[n].reshape(hw)
    g = mc[n, 0]
    row = xn[0]
    for p in range(hw):
        v = row[p] * g
        csum[p] = v
        cmax[p] = v
        carg[p] = 0
    for ch in range(1, c):
        g = mc[n, ch]
        row = xn[ch]
        for p in range(hw):
            v = row[p] * g
            csum[p] += v
            m = cmax[p]
            take = (v > m) | ((v != v) & (m == m))
            cmax[p] = v if take else m
            carg[p] = ch if take else carg[p]
    for p in range(hw):
        csum[p] = csum[p] / fc
    # spatial gate: k×k conv (zero padding k//2) of the two pools, then the sigmoid
    lg = ms[n, 0]
    b = bs[0]
    for i in range(hgt):
        out = lg[i]
        for j in range(wid):
            out[j] = zero
        for q in range(2):
            for di in range(k):
                ii = i + di - r
                if ii < 0 or ii >= hgt:
                    continue
                src = pooled[n, q, ii]
                for dj in range(k):
                    wv = ws[0, q, di, dj]
                    j0 = max(0, r - dj)
                    j1 = min(wid, wid + r - dj)
                    off = dj - r
                    for j in range(j0, j1):
                        out[j] += wv * src[j + off]
        for j in range(wid):
            out[j] = _sigmoid(out[j] + b, zero, one)
    # y = (mc ⊙ x) ⊙ ms
    msr = lg.reshape(hw)
    yn = y[n].reshape((c, hw))
    for ch in range(c):
        g = mc[n, ch]
        row, out = xn[ch], yn[ch]
        for p in range(hw):
            out[p] = (row[p] * g) * msr[p]


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _cbam_fwd_par(
    x, w1, b1, w2, b2, ws, bs, i_avg, zero, one, avg, mx, h_avg, h_max, mc, pooled, arg_c, ms, y
):
    for n in prange(x.shape[0]):
        _cbam_fwd_item(
            x,
            w1,
            b1,
            w2,
            b2,
            ws,
            bs,
            i_avg,
            zero,
            one,
            avg,
            mx,
            h_avg,
            h_max,
            mc,
            pooled,
            arg_c,
            ms,
            y,
            n,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _cbam_fwd_ser(
    x, w1, b1, w2, b2, ws, bs, i_avg, zero, one, avg, mx, h_avg, h_max, mc, pooled, arg_c, ms, y
):
    for n in range(x.shape[0]):
        _cbam_fwd_item(
            x,
            w1,
            b1,
            w2,
            b2,
            ws,
            bs,
            i_avg,
            zero,
            one,
            avg,
            mx,
            h_avg,
            h_max,
            mc,
            pooled,
            arg_c,
            ms,
            y,
            n,
        )


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _cbam_bwd_item(
    x,
    dy,
    w1,
    w2,
    ws,
    i_avg,
    zero,
    one,
    h_avg,
    h_max,
    mc,
    pooled,
    arg_c,
    arg_hw,
    ms,
    dlogit,
    dpooled,
    dws,
    dbs,
    da,
    dpre_avg,
    dpre_max,
    d_avg,
    d_max,
    dx,
    n,
):
    c, hgt, wid = x.shape[1], x.shape[2], x.shape[3]
    hw = hgt * wid
    k = ws.shape[-1]
    r = k // 2
    i_max = 1 - i_avg
    fhw, fc = zero + hw, zero + c
    xn = x[n].reshape((c, hw))
    gn = dy[n].reshape((c, hw))
    msr = ms[n, 0].reshape(hw)
    # dms = Σ_c dy ⊙ F', dlogit = dms ⊙ ms (1 - ms)
    dl = dlogit[n].reshape(hw)
    for p in range(hw):
        dl[p] = zero
    for ch in range(c):
        g = mc[n, ch]
        xr, gr = xn[ch], gn[ch]
        for p in range(hw):
            dl[p] += gr[p] * (xr[p] * g)
    dsum = zero
    for p in range(hw):
        v = msr[p]
        dl[p] = dl[p] * v * (one - v)
        dsum += dl[p]
    dbs[n] = dsum
    # conv adjoint: dpooled (transposed conv) and the per-sample weight gradient
    dl2 = dlogit[n]
    for q in range(2):
        for i in range(hgt):
            out = dpooled[n, q, i]
            for j in range(wid):
                out[j] = zero
        for di in range(k):
            for dj in range(k):
                wv = ws[0, q, di, dj]
                j0 = max(0, r - dj)
                j1 = min(wid, wid + r - dj)
                off = dj - r
                acc = zero
                for i in range(hgt):
                    ii = i + di - r
                    if ii < 0 or ii >= hgt:
                        continue
                    src = pooled[n, q, ii]
                    out = dpooled[n, q, ii]
                    gl = dl2[i]
                    for j in range(j0, j1):
                        out[j + off] += wv * gl[j]
                        acc += src[j + off] * gl[j]
                dws[n, q, di, dj] = acc
    dca = dpooled[n, i_avg].reshape(hw)
    dcm = dpooled[n, i_max].reshape(hw)
    carg = arg_c[n].reshape(hw)
    for p in range(hw):
        dca[p] = dca[p] / fc
    # df1 = dy ⊙ ms + d_cavg / C + [c = arg_c] d_cmax; dmc = Σ_hw df1 ⊙ x
    for ch in range(c):
        xr, gr = xn[ch], gn[ch]
        acc = zero
        for p in range(hw):
            d = gr[p] * msr[p] + dca[p] + (dcm[p] if carg[p] == ch else zero)
            acc += d * xr[p]
        g = mc[n, ch]
        da[n, ch] = acc * g * (one - g)
    _mlp_bwd(da[n], h_avg[n], w1, w2, zero, dpre_avg[n], d_avg[n])
    _mlp_bwd(da[n], h_max[n], w1, w2, zero, dpre_max[n], d_max[n])
    # dx = df1 ⊙ mc + d_avg / HW + [p = arg_hw] d_max
    dxn = dx[n].reshape((c, hw))
    for ch in range(c):
        g = mc[n, ch]
        e = d_avg[n, ch] / fhw
        gr, out = gn[ch], dxn[ch]
        for p in range(hw):
            d = gr[p] * msr[p] + dca[p] + (dcm[p] if carg[p] == ch else zero)
            out[p] = d * g + e
        out[arg_hw[n, ch]] += d_max[n, ch]


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _cbam_bwd_par(
    x,
    dy,
    w1,
    w2,
    ws,
    i_avg,
    zero,
    one,
    h_avg,
    h_max,
    mc,
    pooled,
    arg_c,
    arg_hw,
    ms,
    dlogit,
    dpooled,
    dws,
    dbs,
    da,
    dpre_avg,
    dpre_max,
    d_avg,
    d_max,
    dx,
):
    for n in prange(x.shape[0]):
        _cbam_bwd_item(
            x,
            dy,
            w1,
            w2,
            ws,
            i_avg,
            zero,
            one,
            h_avg,
            h_max,
            mc,
            pooled,
            arg_c,
            arg_hw,
            ms,
            dlogit,
            dpooled,
            dws,
            dbs,
            da,
            dpre_avg,
            dpre_max,
            d_avg,
            d_max,
            dx,
            n,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _cbam_bwd_ser(
    x,
    dy,
    w1,
    w2,
    ws,
    i_avg,
    zero,
    one,
    h_avg,
    h_max,
    mc,
    pooled,
    arg_c,
    arg_hw,
    ms,
    dlogit,
    dpooled,
    dws,
    dbs,
    da,
    dpre_avg,
    dpre_max,
    d_avg,
    d_max,
    dx,
):
    for n in range(x.shape[0]):
        _cbam_bwd_item(
            x,
            dy,
            w1,
            w2,
            ws,
            i_avg,
            zero,
            one,
            h_avg,
            h_max,
            mc,
            pooled,
            arg_c,
            arg_hw,
            ms,
            dlogit,
            dpooled,
            dws,
            dbs,
            da,
            dpre_avg,
            dpre_max,
            d_avg,
            d_max,
            dx,
            n,
        )


# -- Python side -----------------------------------------------------------------------------------


def _parallel(x) -> bool:
    return x.shape[0] > 1 and x.size >= PARALLEL_MIN_WORK


def _p(params, key, dt, shape=None):
    """``params[key]`` as a contiguous array of dtype ``dt`` (zeros of ``shape`` when absent)."""
    a = params.get(key)
    if a is None:
        return np.zeros(shape, dtype=dt)
    return np.ascontiguousarray(a, dtype=dt)


def _params_saved(params):
    return {f"p_{k}": v for k, v in params.items()}


def _params_back(saved):
    return {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}


def _cast_grads(grads, params):
    return {
        k: np.asarray(g).astype(params[k].dtype, copy=False).reshape(params[k].shape)
        for k, g in grads.items()
    }


def _se_fwd(xp, arrays, options, save):
    x, params = arrays["x"], arrays["params"]
    dt = x.dtype
    n, c, hgt, wid = x.shape
    w1 = _p(params, "w1", dt)
    cr = w1.shape[0]
    x3 = np.ascontiguousarray(x).reshape((n, c, hgt * wid))
    z, s = np.empty((n, c), dt), np.empty((n, c), dt)
    h = np.empty((n, cr), dt)
    y = np.empty((n, c, hgt * wid), dt)
    kernel = _se_fwd_par if _parallel(x) else _se_fwd_ser
    kernel(
        x3,
        w1,
        _p(params, "b1", dt, cr),
        _p(params, "w2", dt),
        _p(params, "b2", dt, c),
        dt.type(0),
        dt.type(1),
        z,
        h,
        s,
        y,
    )
    y = y.reshape(x.shape)
    saved = {"x": x, **_params_saved(params), "z": z, "h": h, "s": s} if save else {}
    return (y,), saved


def _se_bwd(xp, saved, options, cts):
    x, params = saved["x"], _params_back(saved)
    dt = x.dtype
    n, c, hgt, wid = x.shape
    w1, w2 = _p(params, "w1", dt), _p(params, "w2", dt)
    cr = w1.shape[0]
    x3 = np.ascontiguousarray(x).reshape((n, c, hgt * wid))
    dy3 = np.ascontiguousarray(cts[0], dtype=dt).reshape((n, c, hgt * wid))
    z, h, s = saved["z"], saved["h"], saved["s"]
    da, dz = np.empty((n, c), dt), np.empty((n, c), dt)
    dpre = np.empty((n, cr), dt)
    dx = np.empty((n, c, hgt * wid), dt)
    kernel = _se_bwd_par if _parallel(x) else _se_bwd_ser
    kernel(x3, dy3, s, h, w1, w2, dt.type(0), dt.type(1), da, dpre, dz, dx)
    grads = {"w1": dpre.T @ z, "w2": da.T @ h}
    if "b1" in params:
        grads["b1"] = np.sum(dpre, axis=0)
    if "b2" in params:
        grads["b2"] = np.sum(da, axis=0)
    return {"x": dx.reshape(x.shape), "params": _cast_grads(grads, params)}


def _cbam_fwd(xp, arrays, options, save):
    x, params = arrays["x"], arrays["params"]
    dt = x.dtype
    n, c, hgt, wid = x.shape
    w1 = _p(params, "w1", dt)
    cr = w1.shape[0]
    i_avg = 0 if options.pool_order == "avg_max" else 1
    xc = np.ascontiguousarray(x)
    avg, mc = np.empty((n, c), dt), np.empty((n, c), dt)
    h_avg, h_max = np.empty((n, cr), dt), np.empty((n, cr), dt)
    pooled = np.empty((n, 2, hgt, wid), dt)
    arg_c = np.empty((n, hgt, wid), np.int64)
    ms = np.empty((n, 1, hgt, wid), dt)
    y = np.empty((n, c, hgt, wid), dt)
    # first maximum of each plane (a NaN wins), as the reference's max/argmax
    x3 = xc.reshape((n, c, hgt * wid))
    arg_hw = np.argmax(x3, axis=2)
    mx = np.ascontiguousarray(np.take_along_axis(x3, arg_hw[:, :, None], axis=2)[:, :, 0])
    kernel = _cbam_fwd_par if _parallel(x) else _cbam_fwd_ser
    kernel(
        xc,
        w1,
        _p(params, "b1", dt, cr),
        _p(params, "w2", dt),
        _p(params, "b2", dt, c),
        _p(params, "w_spatial", dt),
        _p(params, "b_spatial", dt, 1),
        i_avg,
        dt.type(0),
        dt.type(1),
        avg,
        mx,
        h_avg,
        h_max,
        mc,
        pooled,
        arg_c,
        ms,
        y,
    )
    if not save:
        return (y,), {}
    saved = {
        "x": x,
        **_params_saved(params),
        "avg": avg,
        "mx": mx,
        "arg_hw": arg_hw,
        "h_avg": h_avg,
        "h_max": h_max,
        "mc": mc,
        "pooled": pooled,
        "arg_c": arg_c,
        "ms": ms,
    }
    return (y,), saved


def _cbam_bwd(xp, saved, options, cts):
    x, params = saved["x"], _params_back(saved)
    dt = x.dtype
    n, c, hgt, wid = x.shape
    w1, w2, ws = _p(params, "w1", dt), _p(params, "w2", dt), _p(params, "w_spatial", dt)
    cr, k = w1.shape[0], ws.shape[-1]
    i_avg = 0 if options.pool_order == "avg_max" else 1
    xc = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(cts[0], dtype=dt)
    h_avg, h_max = saved["h_avg"], saved["h_max"]
    dlogit = np.empty((n, hgt, wid), dt)
    dpooled = np.empty((n, 2, hgt, wid), dt)
    dws = np.empty((n, 2, k, k), dt)
    dbs = np.empty(n, dt)
    da, d_avg, d_max = np.empty((n, c), dt), np.empty((n, c), dt), np.empty((n, c), dt)
    dpre_avg, dpre_max = np.empty((n, cr), dt), np.empty((n, cr), dt)
    dx = np.empty((n, c, hgt, wid), dt)
    kernel = _cbam_bwd_par if _parallel(x) else _cbam_bwd_ser
    kernel(
        xc,
        dy,
        w1,
        w2,
        ws,
        i_avg,
        dt.type(0),
        dt.type(1),
        h_avg,
        h_max,
        saved["mc"],
        saved["pooled"],
        saved["arg_c"],
        saved["arg_hw"],
        saved["ms"],
        dlogit,
        dpooled,
        dws,
        dbs,
        da,
        dpre_avg,
        dpre_max,
        d_avg,
        d_max,
        dx,
    )
    grads = {
        "w1": dpre_avg.T @ saved["avg"] + dpre_max.T @ saved["mx"],
        "w2": da.T @ h_avg + da.T @ h_max,
        "w_spatial": np.sum(dws, axis=0),
    }
    if "b1" in params:
        grads["b1"] = np.sum(dpre_avg, axis=0) + np.sum(dpre_max, axis=0)
    if "b2" in params:
        db2 = np.sum(da, axis=0)
        grads["b2"] = db2 + db2
    if "b_spatial" in params:
        grads["b_spatial"] = np.sum(dbs)
    return {"x": dx, "params": _cast_grads(grads, params)}


def _blas_quiet(fn):
    """Run ``fn`` with OpenBLAS single-threaded: its pool and the prange pool would otherwise
    take turns spinning on the same cores around the small NumPy products of the MLP."""

    @functools.wraps(fn)
    def wrapper(*args):
        with single_threaded_blas():
            return fn(*args)

    return wrapper


KERNELS = {
    "squeeze_excitation": Kernel(_blas_quiet(_se_fwd), _blas_quiet(_se_bwd)),
    "cbam": Kernel(_blas_quiet(_cbam_fwd), _blas_quiet(_cbam_bwd)),
}

"""Numba-CUDA kernels of windowed local attention (neighbourhood attention 1-D/2-D, HaloNet).

One separable-window kernel set serves every op of :mod:`arrayattn.neighborhood`, exactly as the
CPU kernel (``backends/numba/neighborhood.py``) does: the windows are the small per-axis ``(K, L)``
tables of :mod:`arrayattn._reference.neighborhood` (key position, in-image flag, relative-table
row), and keys are reached by index arithmetic — no unfolded ``K²``-times copy of keys or values,
no dense ``HW×HW`` mask. Maps are viewed as (B, H, W, c) with B the flattened batch·heads; the
relative bias and tables are read through their broadcast strides (:func:`._common.broadcast_plan`),
never materialised per head.

* forward: one thread per query pixel, online softmax over its ``Ky·Kx`` slots; saves the
  logsumexp (``+inf`` for a query with nothing to attend to);
* dQ (one thread per query pixel): ``D = dO·O`` (saved for the next kernel),
  ``dl = P (dO·v - D)`` per slot, ``dq``; with a relative bias the per-slot ``dl`` are stored
  (``B·H·W·K²`` scalars), with relative tables their per-y-slot / per-x-slot sums;
* dK/dV (one thread per *key* pixel): gathers over its inverse neighbourhood (the (query, slot)
  pairs that read it, a CSR table per axis), recomputing ``P`` and ``dl`` from the saved
  logsumexp — no two threads write the same key, no atomics;
* d(rel_bias), d(r_h), d(r_w): one thread per element of the table *as given* (before
  broadcasting), summing in a fixed order over the heads that read it and over the (query, slot)
  pairs that read its row (a CSR table per axis, by relative row).

Every gradient has a single writer: the backward is bitwise deterministic.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from arrayattn._kernel import Kernel

from .._cuda import axis_tables, device_tables
from ._common import (
    as_lib,
    broadcast_plan,
    caller_stream,
    launch,
    lib_of,
    nblocks,
    numba_dtype,
    on_inputs_device,
)

__all__ = ["KERNELS", "axis_tables", "window_attention_backward", "window_attention_forward"]

THREADS = 64


# -- kernels --------------------------------------------------------------------------------------


def _kernels(dtype, d, dv):
    """The compiled kernels for these sizes (compiled once per process, then reused)."""
    return _build(np.dtype(dtype), d, dv)


@functools.cache
def _build(npdtype, d, dv):
    nbt = numba_dtype(npdtype)
    cast = npdtype.type
    zero = cast(0.0)
    ninf = cast(-np.inf)
    inf = cast(np.inf)
    dd, ddv = max(d, 1), max(dv, 1)

    @cuda.jit(device=True, inline=True)
    def logit(
        q,
        k,
        b,
        i,
        j,
        yy,
        xx,
        ok,
        ry,
        rx,
        scale,
        has_bias,
        bflat,
        boff,
        brs,
        bcs,
        has_rh,
        hflat,
        hoff,
        hrs,
        hcs,
        has_rw,
        wflat,
        woff,
        wrs,
        wcs,
    ):
        """s = scale·q·k (0 for a padded key) + q·r_h[ry] + q·r_w[rx] + bias[ry, rx]."""
        s = zero
        if ok:
            for c in range(d):
                s += q[b, i, j, c] * k[b, yy, xx, c]
            s *= scale
        if has_rh:
            t = zero
            for c in range(d):
                t += q[b, i, j, c] * hflat[hoff + ry * hrs + c * hcs]
            s += t
        if has_rw:
            t = zero
            for c in range(d):
                t += q[b, i, j, c] * wflat[woff + rx * wrs + c * wcs]
            s += t
        if has_bias:
            s += bflat[boff + ry * brs + rx * bcs]
        return s

    @cuda.jit
    def fwd(
        q,
        k,
        v,
        ytab,
        xtab,
        zero_mode,
        scale,
        has_bias,
        bflat,
        boffs,
        brs,
        bcs,
        has_rh,
        hflat,
        hoffs,
        hrs,
        hcs,
        has_rw,
        wflat,
        woffs,
        wrs,
        wcs,
        out,
        lse,
    ):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        i = (t // w) % h
        j = t % w
        boff = boffs[b] if has_bias else 0
        hoff = hoffs[b] if has_rh else 0
        woff = woffs[b] if has_rw else 0
        acc = cuda.local.array(ddv, nbt)
        for c in range(dv):
            acc[c] = zero
        m = ninf
        ell = zero
        for a in range(ytab.shape[1]):
            yy = ytab[0, a, i]
            oky = ytab[1, a, i] != 0
            ry = ytab[2, a, i]
            for cc in range(xtab.shape[1]):
                xx = xtab[0, cc, j]
                ok = oky and xtab[1, cc, j] != 0
                if not ok and not zero_mode:
                    continue
                s = logit(
                    q,
                    k,
                    b,
                    i,
                    j,
                    yy,
                    xx,
                    ok,
                    ry,
                    xtab[2, cc, j],
                    scale,
                    has_bias,
                    bflat,
                    boff,
                    brs,
                    bcs,
                    has_rh,
                    hflat,
                    hoff,
                    hrs,
                    hcs,
                    has_rw,
                    wflat,
                    woff,
                    wrs,
                    wcs,
                )
                if s == ninf:
                    continue  # p = 0; while m is still -inf, exp(s - m) would be NaN
                if s > m:  # online softmax: rescale what was accumulated under the old maximum
                    corr = math.exp(m - s)
                    ell *= corr
                    for c in range(dv):
                        acc[c] *= corr
                    m = s
                p = math.exp(s - m)
                ell += p
                if ok:
                    for c in range(dv):
                        acc[c] += p * v[b, yy, xx, c]
        if ell == zero:
            for c in range(dv):
                out[b, i, j, c] = zero
            lse[b, i, j] = inf
        else:
            for c in range(dv):
                out[b, i, j, c] = acc[c] / ell
            lse[b, i, j] = m + math.log(ell)

    @cuda.jit
    def dq_kernel(
        q,
        k,
        v,
        o,
        do,
        lse,
        ytab,
        xtab,
        zero_mode,
        scale,
        has_bias,
        bflat,
        boffs,
        brs,
        bcs,
        has_rh,
        hflat,
        hoffs,
        hrs,
        hcs,
        has_rw,
        wflat,
        woffs,
        wrs,
        wcs,
        dq,
        delta,
        dlst,
        suma,
        sumc,
    ):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        i = (t // w) % h
        j = t % w
        ky, kx = ytab.shape[1], xtab.shape[1]
        boff = boffs[b] if has_bias else 0
        hoff = hoffs[b] if has_rh else 0
        woff = woffs[b] if has_rw else 0
        g = cuda.local.array(dd, nbt)
        for c in range(d):
            g[c] = zero
        big_d = zero
        for c in range(dv):
            big_d += do[b, i, j, c] * o[b, i, j, c]
        delta[b, i, j] = big_d
        lu = lse[b, i, j]
        if has_rh:
            for a in range(ky):
                suma[b, i, j, a] = zero
        if has_rw:
            for cc in range(kx):
                sumc[b, i, j, cc] = zero
        for a in range(ky):
            yy = ytab[0, a, i]
            oky = ytab[1, a, i] != 0
            ry = ytab[2, a, i]
            for cc in range(kx):
                xx = xtab[0, cc, j]
                ok = oky and xtab[1, cc, j] != 0
                if (not ok and not zero_mode) or lu == inf:
                    if has_bias:
                        dlst[b, i, j, a * kx + cc] = zero
                    continue
                s = logit(
                    q,
                    k,
                    b,
                    i,
                    j,
                    yy,
                    xx,
                    ok,
                    ry,
                    xtab[2, cc, j],
                    scale,
                    has_bias,
                    bflat,
                    boff,
                    brs,
                    bcs,
                    has_rh,
                    hflat,
                    hoff,
                    hrs,
                    hcs,
                    has_rw,
                    wflat,
                    woff,
                    wrs,
                    wcs,
                )
                p = math.exp(s - lu)
                dp = zero
                if ok:
                    for c in range(dv):
                        dp += do[b, i, j, c] * v[b, yy, xx, c]
                dl = p * (dp - big_d)
                if has_bias:
                    dlst[b, i, j, a * kx + cc] = dl
                if has_rh:
                    suma[b, i, j, a] += dl
                if has_rw:
                    sumc[b, i, j, cc] += dl
                if ok:
                    f = dl * scale
                    for c in range(d):
                        g[c] += f * k[b, yy, xx, c]
        if has_rh:
            for a in range(ky):
                f = suma[b, i, j, a]
                ry = ytab[2, a, i]
                for c in range(d):
                    g[c] += f * hflat[hoff + ry * hrs + c * hcs]
        if has_rw:
            for cc in range(kx):
                f = sumc[b, i, j, cc]
                rx = xtab[2, cc, j]
                for c in range(d):
                    g[c] += f * wflat[woff + rx * wrs + c * wcs]
        for c in range(d):
            dq[b, i, j, c] = g[c]

    @cuda.jit
    def dkdv_kernel(
        q,
        k,
        v,
        do,
        lse,
        delta,
        ytab,
        xtab,
        yptr,
        yinv,
        xptr,
        xinv,
        scale,
        has_bias,
        bflat,
        boffs,
        brs,
        bcs,
        has_rh,
        hflat,
        hoffs,
        hrs,
        hcs,
        has_rw,
        wflat,
        woffs,
        wrs,
        wcs,
        dk,
        dvv,
    ):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        yy = (t // w) % h  # the key pixel (yy, xx)
        xx = t % w
        boff = boffs[b] if has_bias else 0
        hoff = hoffs[b] if has_rh else 0
        woff = woffs[b] if has_rw else 0
        gk = cuda.local.array(dd, nbt)
        gv = cuda.local.array(ddv, nbt)
        for c in range(d):
            gk[c] = zero
        for c in range(dv):
            gv[c] = zero
        for u in range(yptr[yy], yptr[yy + 1]):
            i = yinv[0, u]
            ry = ytab[2, yinv[1, u], i]
            for z in range(xptr[xx], xptr[xx + 1]):
                j = xinv[0, z]
                lu = lse[b, i, j]
                if lu == inf:
                    continue
                s = logit(
                    q,
                    k,
                    b,
                    i,
                    j,
                    yy,
                    xx,
                    True,
                    ry,
                    xtab[2, xinv[1, z], j],
                    scale,
                    has_bias,
                    bflat,
                    boff,
                    brs,
                    bcs,
                    has_rh,
                    hflat,
                    hoff,
                    hrs,
                    hcs,
                    has_rw,
                    wflat,
                    woff,
                    wrs,
                    wcs,
                )
                p = math.exp(s - lu)
                dp = zero
                for c in range(dv):
                    dp += do[b, i, j, c] * v[b, yy, xx, c]
                dl = p * (dp - delta[b, i, j])
                for c in range(d):
                    gk[c] += dl * q[b, i, j, c]
                for c in range(dv):
                    gv[c] += p * do[b, i, j, c]
        for c in range(d):
            dk[b, yy, xx, c] = gk[c] * scale
        for c in range(dv):
            dvv[b, yy, xx, c] = gv[c]

    @cuda.jit
    def dbias_kernel(dlst, kx, yrptr, yrel, xrptr, xrel, boffs, nrows, ncols, dbias):
        # one thread per element of the bias data ((..., Ty, Tx), C-contiguous)
        e = cuda.grid(1)
        if e >= dbias.shape[0]:
            return
        rc = nrows * ncols
        head = e - e % rc
        ty = (e % rc) // ncols
        tx = e % ncols
        acc = zero
        for b in range(dlst.shape[0]):
            if boffs[b] != head:
                continue
            for u in range(yrptr[ty], yrptr[ty + 1]):
                i = yrel[0, u]
                a = yrel[1, u]
                for z in range(xrptr[tx], xrptr[tx + 1]):
                    acc += dlst[b, i, xrel[0, z], a * kx + xrel[1, z]]
        dbias[e] = acc

    @cuda.jit
    def dtable_kernel(q, sums, axis, rptr, rel, offs, nrows, ncols, dtab):
        # one thread per element of r_h (axis 0) or r_w (axis 1) as given ((..., T, d))
        e = cuda.grid(1)
        if e >= dtab.shape[0]:
            return
        rc = nrows * ncols
        head = e - e % rc
        row = (e % rc) // ncols
        c = e % ncols
        acc = zero
        for b in range(q.shape[0]):
            if offs[b] != head:
                continue
            for u in range(rptr[row], rptr[row + 1]):
                pos = rel[0, u]
                slot = rel[1, u]
                if axis == 0:
                    for j in range(q.shape[2]):
                        acc += sums[b, pos, j, slot] * q[b, pos, j, c]
                else:
                    for i in range(q.shape[1]):
                        acc += sums[b, i, pos, slot] * q[b, i, pos, c]
        dtab[e] = acc

    return {
        "fwd": fwd,
        "dq": dq_kernel,
        "dkdv": dkdv_kernel,
        "dbias": dbias_kernel,
        "dtable": dtable_kernel,
    }


# -- launchers (device arrays in, device arrays out; NumPy arrays under the simulator) ----------


def _as4(lib, x, nb, dtype):
    return lib.ascontiguousarray(x.astype(dtype, copy=False)).reshape((nb,) + tuple(x.shape[-3:]))


def _plan(lib, a, batch, rows, cols, dtype):
    """(flag, flat, offsets, row stride, col stride, data) of an optional broadcast table."""
    if a is None:
        return (False, lib.zeros(1, dtype=dtype), lib.zeros(1, dtype=np.int64), 0, 0, None)
    flat, offs, rs, cs, data = broadcast_plan(lib, a, batch, rows, cols, dtype=dtype)
    return (True, flat, offs, rs, cs, data)


def _plans(lib, wy, wx, batch, d, dtype, rel_bias, r_h, r_w):
    return (
        _plan(lib, rel_bias, batch, wy.table, wx.table, dtype),
        _plan(lib, r_h, batch, wy.table, d, dtype),
        _plan(lib, r_w, batch, wx.table, d, dtype),
    )


@on_inputs_device
def window_attention_forward(
    q, k, v, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None, block=None
):
    """``(out, lse)`` like the reference ``window_attention_forward`` (float32/float64).

    ``q``, ``k``, ``v`` are (..., H, W, ·) device arrays (NumPy under the simulator); ``wy``,
    ``wx`` the per-axis :class:`~arrayattn._reference.neighborhood.AxisWindows`.
    """
    q, k, v, rel_bias, r_h, r_w = (as_lib(a) for a in (q, k, v, rel_bias, r_h, r_w))
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    out = lib.empty((nb, h, w, dv), dtype=dtype)
    lse = lib.empty((nb, h, w), dtype=dtype)
    npix = nb * h * w
    if npix:
        ytab, xtab = device_tables(lib, wy)[0], device_tables(lib, wx)[0]
        pb, ph, pw = _plans(lib, wy, wx, batch, d, dtype, rel_bias, r_h, r_w)
        launch(
            _kernels(dtype, d, dv)["fwd"],
            nblocks(npix, THREADS),
            THREADS,
            caller_stream(lib),
            _as4(lib, q, nb, dtype),
            _as4(lib, k, nb, dtype),
            _as4(lib, v, nb, dtype),
            ytab,
            xtab,
            boundary == "zero",
            dtype.type(scale),
            *pb[:5],
            *ph[:5],
            *pw[:5],
            out,
            lse,
        )
    return out.reshape(batch + (h, w, dv)), lse.reshape(batch + (h, w))


@on_inputs_device
def window_attention_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    wy,
    wx,
    *,
    boundary,
    scale,
    rel_bias=None,
    r_h=None,
    r_w=None,
    block=None,
):
    """``(dq, dk, dv, drel_bias, dr_h, dr_w)`` like the reference ``window_attention_backward``."""
    q, k, v, out, lse, dout, rel_bias, r_h, r_w = (
        as_lib(a) for a in (q, k, v, out, lse, dout, rel_bias, r_h, r_w)
    )
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    ky, kx = wy.idx.shape[0], wx.idx.shape[0]
    dq = lib.zeros((nb, h, w, d), dtype=dtype)
    dk = lib.zeros((nb, h, w, d), dtype=dtype)
    dvv = lib.zeros((nb, h, w, dv), dtype=dtype)
    pb, ph, pw = _plans(lib, wy, wx, batch, d, dtype, rel_bias, r_h, r_w)
    grads = [None if p[5] is None else lib.zeros(p[5].size, dtype=dtype) for p in (pb, ph, pw)]
    npix = nb * h * w
    if npix:
        kerns = _kernels(dtype, d, dv)
        ytab, yptr, yinv, yrptr, yrel = device_tables(lib, wy)
        xtab, xptr, xinv, xrptr, xrel = device_tables(lib, wx)
        q4, k4, v4 = _as4(lib, q, nb, dtype), _as4(lib, k, nb, dtype), _as4(lib, v, nb, dtype)
        o4, do4 = _as4(lib, out, nb, dtype), _as4(lib, dout, nb, dtype)
        lse3 = lib.ascontiguousarray(lse.astype(dtype, copy=False)).reshape(nb, h, w)
        delta = lib.empty((nb, h, w), dtype=dtype)
        one = (1, 1, 1, 1)
        dlst = lib.empty((nb, h, w, ky * kx) if pb[0] else one, dtype=dtype)
        suma = lib.empty((nb, h, w, ky) if ph[0] else one, dtype=dtype)
        sumc = lib.empty((nb, h, w, kx) if pw[0] else one, dtype=dtype)
        sc = dtype.type(scale)
        stream = caller_stream(lib)
        grid = (nblocks(npix, THREADS), THREADS, stream)
        launch(
            kerns["dq"],
            *grid,
            q4,
            k4,
            v4,
            o4,
            do4,
            lse3,
            ytab,
            xtab,
            boundary == "zero",
            sc,
            *pb[:5],
            *ph[:5],
            *pw[:5],
            dq,
            delta,
            dlst,
            suma,
            sumc,
        )
        launch(
            kerns["dkdv"],
            *grid,
            q4,
            k4,
            v4,
            do4,
            lse3,
            delta,
            ytab,
            xtab,
            yptr,
            yinv,
            xptr,
            xinv,
            sc,
            *pb[:5],
            *ph[:5],
            *pw[:5],
            dk,
            dvv,
        )
        if pb[0] and grads[0].size:
            n = grads[0].size
            launch(
                kerns["dbias"],
                nblocks(n, THREADS),
                THREADS,
                stream,
                dlst,
                kx,
                yrptr,
                yrel,
                xrptr,
                xrel,
                pb[2],
                wy.table,
                wx.table,
                grads[0],
            )
        for axis, p, sums, rptr, rel, rows, slot in (
            (0, ph, suma, yrptr, yrel, wy.table, 1),
            (1, pw, sumc, xrptr, xrel, wx.table, 2),
        ):
            g = grads[slot]
            if p[0] and g.size:
                launch(
                    kerns["dtable"],
                    nblocks(g.size, THREADS),
                    THREADS,
                    stream,
                    q4,
                    sums,
                    axis,
                    rptr,
                    rel,
                    p[2],
                    rows,
                    d,
                    g,
                )
    like = (rel_bias, r_h, r_w)
    grads = [
        None if g is None else g.reshape(a.shape).astype(a.dtype, copy=False)
        for g, a in zip(grads, like, strict=True)
    ]
    return (dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape), *grads)


# -- Kernel ---------------------------------------------------------------------------------------


# The kernels run in the window convention of arrayattn._glue.neighborhood (the op adapts them);
# float16/bfloat16 are the cupy backend's.
_KERNEL = Kernel(window_attention_forward, window_attention_backward)

KERNELS = {
    "neighborhood_attention_2d": _KERNEL,
    "neighborhood_attention_1d": _KERNEL,
    "halo_attention": _KERNEL,
}

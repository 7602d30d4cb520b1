"""Numba CPU kernel of HaloNet blocked local attention, block by block with BLAS.

Every ``b×b`` query block of HaloNet shares one ``(b+2h)×(b+2h)`` key window, so the block is a
small dense attention: per (batch·head, query block) the window's keys and values are gathered
into a per-thread buffer (zero rows for the zero padding: padded keys stay in the softmax with the
relative term alone, as in timm and the reference), the logits are one GEMM
``Q_blk K_winᵀ`` (plus the relative terms ``q·r_h``, ``q·r_w``: one GEMM of the block's queries
against each table, then a gather-add per slot), the softmax uses the vectorizable ``exp2`` of
:mod:`._exp`, and the output is one GEMM ``P V_win``.

Backward (docs/derivations/neighborhood.rst): ``P`` is recomputed from the saved logsumexp,
``dV_win = Pᵀ dO``, ``dP = dO V_winᵀ``, ``dS = P ⊙ (dP − D)``, ``dQ = scale·dS K_win``
(+ relative terms),
``dK_win = scale·dSᵀ Q``. The window gradients of neighbouring blocks overlap; they are added to
``dk``/``dv`` in phases: blocks ``(I, J)`` with the same ``(I mod S, J mod S)``,
``S = 1 + ceil(2h/b)``, have disjoint windows and run in parallel, and the ``S²`` phases run in a
fixed order, so every key's gradient is summed in an order that does not depend on the threads.
The relative-table gradients are kept per block and reduced in block order afterwards.
Only per-block buffers are allocated: no unfolded copy of the keys/values, no ``HW×HW`` matrix.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel
from arrayattn._xp import sum_to_shape

from ._blas import BLAS, gemm, single_threaded_blas
from ._exp import LOG2E, exp2, row_max
from .neighborhood import (
    _flat,
    _prepare,
    _tables,
    window_attention_backward,
    window_attention_forward,
)

__all__ = ["KERNELS", "halo_backward", "halo_forward"]


@njit(cache=True)
def _gather(src, bh, y0, x0, n, length_y, length_x, buf):
    """buf[(a·n + c), :] = src[bh, y0 + a, x0 + c, :] (zero rows outside the image)."""
    width = src.shape[3]
    for a in range(n):
        y = y0 + a
        for c in range(n):
            x = x0 + c
            row = buf[a * n + c]
            if 0 <= y < length_y and 0 <= x < length_x:
                s = src[bh, y, x]
                for e in range(width):
                    row[e] = s[e]
            else:
                for e in range(width):
                    row[e] = 0


@njit(cache=True)
def _gather_block(src, bh, y0, x0, b, buf):
    width = src.shape[3]
    for r in range(b):
        for c in range(b):
            s = src[bh, y0 + r, x0 + c]
            row = buf[r * b + c]
            for e in range(width):
                row[e] = s[e]


@njit(cache=True)
def _logits(
    q, k, rh, rw, ry, rx, has_rh, has_rw, bh, i0, j0, b, hl, alpha2, log2e, qb, kw, qrh, qrw, s
):
    """s = log2(e)·(scale·Q Kᵀ + Q r_hᵀ[rel_y] + Q r_wᵀ[rel_x]) of block (i0, j0)."""
    nq = b * b
    win = b + 2 * hl
    nk = win * win
    d = q.shape[3]
    _gather_block(q, bh, i0, j0, b, qb)
    _gather(k, bh, i0 - hl, j0 - hl, win, q.shape[1], q.shape[2], kw)
    gemm(False, True, nq, nk, d, alpha2, qb, 0, d, kw, 0, d, 0.0, s, 0, nk)
    if has_rh:
        th = rh.shape[1]
        gemm(False, True, nq, th, d, log2e, qb, 0, d, rh, bh * th * d, d, 0.0, qrh, 0, th)
        for p in range(nq):
            i = i0 + p // b
            srow = s[p]
            qrow = qrh[p]
            for a in range(win):
                val = qrow[ry[a, i]]
                base = a * win
                for c in range(win):
                    srow[base + c] += val
    if has_rw:
        tw = rw.shape[1]
        gemm(False, True, nq, tw, d, log2e, qb, 0, d, rw, bh * tw * d, d, 0.0, qrw, 0, tw)
        for p in range(nq):
            j = j0 + p % b
            srow = s[p]
            qrow = qrw[p]
            for c in range(win):
                val = qrow[rx[c, j]]
                for a in range(win):
                    srow[a * win + c] += val


@njit(parallel=True, cache=True)
def _forward(q, k, v, rh, rw, ry, rx, has_rh, has_rw, b, hl, alpha2, log2e, out, lse):
    nbh, hh, ww, d = q.shape
    dv = v.shape[3]
    nby, nbx = hh // b, ww // b
    win = b + 2 * hl
    nq, nk = b * b, win * win
    th, tw = rh.shape[1], rw.shape[1]
    zero = log2e - log2e
    one = log2e / log2e
    ninf = -np.inf
    ln2 = one / log2e
    for t in prange(nbh * nby * nbx):
        bh = t // (nby * nbx)
        blk = t - bh * (nby * nbx)
        i0 = (blk // nbx) * b
        j0 = (blk % nbx) * b
        qb = np.empty((nq, d), q.dtype)
        kw = np.empty((nk, d), q.dtype)
        vw = np.empty((nk, dv), q.dtype)
        qrh = np.empty((nq, th), q.dtype)
        qrw = np.empty((nq, tw), q.dtype)
        s = np.empty((nq, nk), q.dtype)
        ob = np.empty((nq, dv), q.dtype)
        _logits(
            q,
            k,
            rh,
            rw,
            ry,
            rx,
            has_rh,
            has_rw,
            bh,
            i0,
            j0,
            b,
            hl,
            alpha2,
            log2e,
            qb,
            kw,
            qrh,
            qrw,
            s,
        )
        _gather(v, bh, i0 - hl, j0 - hl, win, hh, ww, vw)
        ls = np.empty(nq, q.dtype)
        ms = np.empty(nq, q.dtype)
        for p in range(nq):
            srow = s[p]
            m = row_max(srow, nk, srow[0])
            m = zero if m == ninf else m
            acc = zero
            for c in range(nk):
                e = exp2(srow[c] - m)
                srow[c] = e
                acc += e
            ls[p] = acc
            ms[p] = m
        gemm(False, False, nq, dv, nk, 1.0, s, 0, nk, vw, 0, dv, 0.0, ob, 0, dv)
        for p in range(nq):
            i = i0 + p // b
            j = j0 + p % b
            orow = out[bh, i, j]
            brow = ob[p]
            if ls[p] == zero:
                for e in range(dv):
                    orow[e] = zero
                lse[bh, i, j] = np.inf
            else:
                inv = one / ls[p]
                for e in range(dv):
                    orow[e] = brow[e] * inv
                lse[bh, i, j] = (ms[p] + np.log2(ls[p])) * ln2


@njit(parallel=True, cache=True)
def _backward(
    q,
    k,
    v,
    dout,
    lse2,
    delta,
    rh,
    rw,
    ry,
    rx,
    has_rh,
    has_rw,
    b,
    hl,
    alpha2,
    scale,
    log2e,
    stride,
    dq,
    dk,
    dv,
    drh_blocks,
    drw_blocks,
):
    nbh, hh, ww, d = q.shape
    dvw = v.shape[3]
    nby, nbx = hh // b, ww // b
    win = b + 2 * hl
    nq, nk = b * b, win * win
    th, tw = rh.shape[1], rw.shape[1]
    for phase in range(stride * stride):
        py, px = phase // stride, phase % stride
        my = (nby - py + stride - 1) // stride  # blocks of this phase along each axis
        mx = (nbx - px + stride - 1) // stride
        for t in prange(nbh * my * mx):
            bh = t // (my * mx)
            rest = t - bh * (my * mx)
            bi = py + (rest // mx) * stride
            bj = px + (rest % mx) * stride
            i0, j0 = bi * b, bj * b
            item = (bh * nby + bi) * nbx + bj
            qb = np.empty((nq, d), q.dtype)
            kw = np.empty((nk, d), q.dtype)
            vw = np.empty((nk, dvw), q.dtype)
            dob = np.empty((nq, dvw), q.dtype)
            qrh = np.empty((nq, th), q.dtype)
            qrw = np.empty((nq, tw), q.dtype)
            p = np.empty((nq, nk), q.dtype)
            ds = np.empty((nq, nk), q.dtype)
            dqb = np.empty((nq, d), q.dtype)
            dkw = np.empty((nk, d), q.dtype)
            dvwin = np.empty((nk, dvw), q.dtype)
            _logits(
                q,
                k,
                rh,
                rw,
                ry,
                rx,
                has_rh,
                has_rw,
                bh,
                i0,
                j0,
                b,
                hl,
                alpha2,
                log2e,
                qb,
                kw,
                qrh,
                qrw,
                p,
            )
            _gather(v, bh, i0 - hl, j0 - hl, win, hh, ww, vw)
            _gather_block(dout, bh, i0, j0, b, dob)
            for r in range(nq):
                shift = lse2[bh, i0 + r // b, j0 + r % b]
                prow = p[r]
                for c in range(nk):
                    prow[c] = exp2(prow[c] - shift)
            # dV_win = Pᵀ dO ; dP = dO V_winᵀ ; dS = P ⊙ (dP − D)
            gemm(True, False, nk, dvw, nq, 1.0, p, 0, nk, dob, 0, dvw, 0.0, dvwin, 0, dvw)
            gemm(False, True, nq, nk, dvw, 1.0, dob, 0, dvw, vw, 0, dvw, 0.0, ds, 0, nk)
            for r in range(nq):
                dl = delta[bh, i0 + r // b, j0 + r % b]
                prow = p[r]
                srow = ds[r]
                for c in range(nk):
                    srow[c] = prow[c] * (srow[c] - dl)
            # dQ = scale dS K_win ; dK_win = scale dSᵀ Q
            gemm(False, False, nq, d, nk, scale, ds, 0, nk, kw, 0, d, 0.0, dqb, 0, d)
            gemm(True, False, nk, d, nq, scale, ds, 0, nk, qb, 0, d, 0.0, dkw, 0, d)
            if has_rh:
                # dqrh[p, row] = Σ over the slots of p reading table row 'row' of dS
                for r in range(nq):
                    i = i0 + r // b
                    hrow = qrh[r]
                    for e in range(th):
                        hrow[e] = 0
                    srow = ds[r]
                    for a in range(win):
                        acc = srow[a * win]
                        for c in range(1, win):
                            acc += srow[a * win + c]
                        hrow[ry[a, i]] += acc
                gemm(False, False, nq, d, th, 1.0, qrh, 0, th, rh, bh * th * d, d, 1.0, dqb, 0, d)
                gemm(
                    True,
                    False,
                    th,
                    d,
                    nq,
                    1.0,
                    qrh,
                    0,
                    th,
                    qb,
                    0,
                    d,
                    0.0,
                    drh_blocks,
                    item * th * d,
                    d,
                )
            if has_rw:
                for r in range(nq):
                    j = j0 + r % b
                    wrow = qrw[r]
                    for e in range(tw):
                        wrow[e] = 0
                    srow = ds[r]
                    for c in range(win):
                        acc = srow[c]
                        for a in range(1, win):
                            acc += srow[a * win + c]
                        wrow[rx[c, j]] += acc
                gemm(False, False, nq, d, tw, 1.0, qrw, 0, tw, rw, bh * tw * d, d, 1.0, dqb, 0, d)
                gemm(
                    True,
                    False,
                    tw,
                    d,
                    nq,
                    1.0,
                    qrw,
                    0,
                    tw,
                    qb,
                    0,
                    d,
                    0.0,
                    drw_blocks,
                    item * tw * d,
                    d,
                )
            for r in range(nq):
                dst = dq[bh, i0 + r // b, j0 + r % b]
                src = dqb[r]
                for e in range(d):
                    dst[e] = src[e]
            # window gradients of in-image keys (the padding's are discarded)
            for a in range(win):
                y = i0 - hl + a
                if y < 0 or y >= hh:
                    continue
                for c in range(win):
                    x = j0 - hl + c
                    if x < 0 or x >= ww:
                        continue
                    slot = a * win + c
                    gk = dk[bh, y, x]
                    sk = dkw[slot]
                    for e in range(d):
                        gk[e] += sk[e]
                    gv = dv[bh, y, x]
                    sv = dvwin[slot]
                    for e in range(dvw):
                        gv[e] += sv[e]


# -- glue ------------------------------------------------------------------------------------------


def _empty(q, v):
    return 0 in q.shape or 0 in v.shape


def halo_forward(
    q, k, v, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None, block=None
):
    """``(out, lse)`` of halo attention in the window convention; ``block = (b, halo)``."""
    if _empty(q, v):  # nothing to block: the generic window kernel handles empty arrays
        return window_attention_forward(
            q, k, v, wy, wx, boundary=boundary, scale=scale, rel_bias=rel_bias, r_h=r_h, r_w=r_w
        )
    batch, flags, tabs = _prepare(q, v, wy, wx, boundary, rel_bias, r_h, r_w)
    dtype = q.dtype
    cdt = dtype.type
    b, hl = block
    qf, kf, vf = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    out = np.empty(vf.shape, dtype=dtype)
    lse = np.empty(qf.shape[:-1], dtype=dtype)
    with single_threaded_blas():
        _forward(
            qf, kf, vf, tabs["rh"], tabs["rw"], _tables(wy)[2], _tables(wx)[2], bool(flags[1]),
            bool(flags[2]), b, hl, cdt(scale * LOG2E), cdt(LOG2E), out, lse,
        )  # fmt: skip
    return out.reshape(tuple(batch) + out.shape[1:]), lse.reshape(tuple(batch) + lse.shape[1:])


def halo_backward(
    q, k, v, out, lse, dout, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None,
    block=None,
):  # fmt: skip
    """``(dq, dk, dv, None, dr_h, dr_w)`` of halo attention in the window convention."""
    if _empty(q, v):
        return window_attention_backward(
            q, k, v, out, lse, dout, wy, wx, boundary=boundary, scale=scale, rel_bias=rel_bias,
            r_h=r_h, r_w=r_w,
        )  # fmt: skip
    batch, flags, tabs = _prepare(q, v, wy, wx, boundary, rel_bias, r_h, r_w)
    dtype = q.dtype
    cdt = dtype.type
    b, hl = block
    qf, kf, vf = _flat(q, dtype), _flat(k, dtype), _flat(v, dtype)
    of, dof = _flat(out, dtype), _flat(dout, dtype)
    nbh, hh, ww, d = qf.shape
    lse2 = np.ascontiguousarray(lse.reshape(qf.shape[:-1]), dtype=dtype) * cdt(LOG2E)
    delta = np.einsum("bijc,bijc->bij", dof, of)
    has_rh, has_rw = bool(flags[1]), bool(flags[2])
    nblocks = nbh * (hh // b) * (ww // b)
    th, tw = tabs["rh"].shape[1], tabs["rw"].shape[1]
    drh_blocks = np.empty((nblocks, th, d) if has_rh else (1, 1, 1), dtype=dtype)
    drw_blocks = np.empty((nblocks, tw, d) if has_rw else (1, 1, 1), dtype=dtype)
    dq = np.empty_like(qf)
    dk = np.zeros_like(kf)
    dv = np.zeros_like(vf)
    stride = 1 + -(-2 * hl // b)
    with single_threaded_blas():
        _backward(
            qf,
            kf,
            vf,
            dof,
            lse2,
            delta,
            tabs["rh"],
            tabs["rw"],
            _tables(wy)[2],
            _tables(wx)[2],
            has_rh,
            has_rw,
            b,
            hl,
            cdt(scale * LOG2E),
            cdt(scale),
            cdt(LOG2E),
            stride,
            dq,
            dk,
            dv,
            drh_blocks,
            drw_blocks,
        )
    lead = tuple(batch)

    def reduce(blocks, tail, like):
        per = blocks.reshape((nbh, -1) + tail).sum(axis=1).reshape(lead + tail)
        return sum_to_shape(np, per, like.shape).astype(like.dtype, copy=False)

    drh = reduce(drh_blocks, (th, d), r_h) if has_rh else None
    drw = reduce(drw_blocks, (tw, d), r_w) if has_rw else None
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None, drh, drw


# The kernel runs in the window convention of arrayattn._glue.neighborhood (the op adapts it).
KERNELS = {"halo_attention": Kernel(halo_forward, halo_backward, requires=(BLAS,))}

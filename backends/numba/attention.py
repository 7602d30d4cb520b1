"""Numba kernels of scaled dot-product attention: FlashAttention-2 forward and backward on CPU.

Forward: ``prange`` over (batch·heads, query tiles); each work item walks the key tiles with an
online softmax (docs/derivations/attention.rst). Backward (FA2 Alg. 2): ``prange`` over (group of
heads, chunk of key tiles); each work item owns the dK/dV rows of its key tiles (and every dbias
element it touches) and accumulates dQ of its chunk into a buffer of its own; the chunks' dQ
buffers are added in a fixed order afterwards, so results are bitwise deterministic whatever the
thread scheduling.

Tile products go through the CBLAS ``sgemm``/``dgemm`` of the OpenBLAS that NumPy ships (called
from compiled code as an external symbol, so ``cache=True`` works), kept single-threaded while the
kernels run (the parallelism is ours). Scale, bias, mask, causal band, row max, exponential, row sum
and the rescale of the output accumulator are fused in one pass over each score row; the exponential
is the vectorizable :func:`exp2` of ``_exp`` (logits are carried in base 2: ``s·log2(e)``).

Masks and biases are read through their broadcast strides (never materialised at (..., Lq, Lk));
key tiles past the causal diagonal and tiles whose boolean mask is all False are skipped.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel

from ._blas import BLAS, gemm, single_threaded_blas
from ._exp import LOG2E, exp2, row_max

__all__ = ["KERNELS", "sdpa_backward", "sdpa_forward"]

#: (block_q, block_k) of the forward and the backward kernels. Module attributes so tests can
#: exercise tiles that do not divide L.
FWD_BLOCKS = (128, 256)
BWD_BLOCKS = (128, 128)
#: The backward splits the key tiles of a head group into chunks (each with a dQ buffer of its own)
#: until there are at least this many work items; a function of the shapes only, not of the thread
#: count, so the summation order (and the result) never depends on the machine.
MIN_BWD_ITEMS = 4


# -- fused row passes ------------------------------------------------------------------------------


@njit(cache=True, fastmath={"reassoc", "contract"})
def _row_exp2_sum(s, n, shift, zero):
    # p = 2**(s - shift) in place, returns sum(p). -inf (masked) gives exactly 0.
    acc = zero
    for c in range(n):
        p = exp2(s[c] - shift)
        s[c] = p
        acc += p
    return acc


@njit(cache=True)
def _row_exp2(s, n, shift):
    for c in range(n):
        s[c] = exp2(s[c] - shift)


@njit(cache=True)
def _row_logits(
    srow,
    nk,
    i,
    j0,
    log2e,
    ninf,
    has_mask,
    mflat,
    moff,
    mrs,
    mcs,
    has_bias,
    bflat,
    boff,
    brs,
    bcs,
    causal,
    coff,
):
    """Add bias·log2(e), set -inf where the mask or the causal band excludes, on one score row."""
    if has_bias:
        base = boff + i * brs + j0 * bcs
        if bcs == 1:
            for c in range(nk):
                srow[c] += bflat[base + c] * log2e
        else:
            for c in range(nk):
                srow[c] += bflat[base + c * bcs] * log2e
    if has_mask:
        base = moff + i * mrs + j0 * mcs
        for c in range(nk):
            if not mflat[base + c * mcs]:
                srow[c] = ninf
    if causal:
        start = i + coff - j0 + 1  # first excluded column of this tile
        if start < 0:
            start = 0
        for c in range(start, nk):
            srow[c] = ninf


@njit(cache=True)
def _tile_all_masked(mflat, moff, mrs, mcs, i0, i1, j0, j1):
    for i in range(i0, i1):
        base = moff + i * mrs
        for j in range(j0, j1):
            if mflat[base + j * mcs]:
                return False
    return True


# -- forward ---------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _fwd_kernel(
    q,
    k,
    v,
    groups,
    alpha2,
    log2e,
    ninf,
    has_mask,
    mflat,
    moffs,
    mrs,
    mcs,
    has_bias,
    bflat,
    boffs,
    brs,
    bcs,
    causal,
    coff,
    bq,
    bk,
    out,
    lse,
):
    nbh, lq, d = q.shape
    lk = k.shape[1]
    dv = v.shape[2]
    zero = log2e - log2e
    one = log2e / log2e
    inf = -ninf
    bq = max(1, min(bq, lq))  # tile buffers no larger than the problem
    bk = max(1, min(bk, lk))
    nqt = (lq + bq - 1) // bq
    nkt = (lk + bk - 1) // bk
    for w in prange(nbh * nqt):
        bh = w // nqt
        i0 = (w % nqt) * bq
        i1 = min(i0 + bq, lq)
        ni = i1 - i0
        kv = bh // groups
        moff = moffs[bh] if has_mask else 0
        boff = boffs[bh] if has_bias else 0
        s = np.empty((bq, bk), q.dtype)
        acc = np.zeros((bq, dv), q.dtype)
        m = np.full(bq, ninf, q.dtype)
        ell = np.zeros(bq, q.dtype)
        for jt in range(nkt):
            j0 = jt * bk
            j1 = min(j0 + bk, lk)
            nk = j1 - j0
            if causal and j0 > i1 - 1 + coff:
                break  # this and every later key tile lies past the diagonal
            if has_mask and _tile_all_masked(mflat, moff, mrs, mcs, i0, i1, j0, j1):
                continue
            cross = causal and j1 - 1 > i0 + coff
            gemm(
                False,
                True,
                ni,
                nk,
                d,
                alpha2,
                q,
                (bh * lq + i0) * d,
                d,
                k,
                (kv * lk + j0) * d,
                d,
                0.0,
                s,
                0,
                bk,
            )
            for r in range(ni):
                srow = s[r]
                _row_logits(
                    srow,
                    nk,
                    i0 + r,
                    j0,
                    log2e,
                    ninf,
                    has_mask,
                    mflat,
                    moff,
                    mrs,
                    mcs,
                    has_bias,
                    bflat,
                    boff,
                    brs,
                    bcs,
                    cross,
                    coff,
                )
                m_old = m[r]
                m_new = row_max(srow, nk, m_old)
                m_use = zero if m_new == ninf else m_new
                total = _row_exp2_sum(srow, nk, m_use, zero)
                corr = exp2(m_old - m_use)
                ell[r] = ell[r] * corr + total
                m[r] = m_new
                if corr != one:
                    arow = acc[r]
                    for c in range(dv):
                        arow[c] *= corr
            gemm(
                False, False, ni, dv, nk, 1.0, s, 0, bk, v, (kv * lk + j0) * dv, dv, 1.0, acc, 0, dv
            )
        ln2 = one / log2e
        for r in range(ni):
            lr = ell[r]
            orow = out[bh, i0 + r]
            if lr == zero:
                for c in range(dv):
                    orow[c] = zero
                lse[bh, i0 + r] = inf
            else:
                inv = one / lr
                arow = acc[r]
                for c in range(dv):
                    orow[c] = arow[c] * inv
                lse[bh, i0 + r] = (m[r] + np.log2(lr)) * ln2


# -- backward --------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _bwd_kernel(
    q,
    k,
    v,
    do,
    lse2,
    delta,
    groups,
    alpha2,
    scale,
    log2e,
    ninf,
    has_mask,
    mflat,
    moffs,
    mrs,
    mcs,
    has_bias,
    bflat,
    boffs,
    brs,
    bcs,
    dbflat,
    causal,
    coff,
    bq,
    bk,
    members,
    ptr,
    nchunks,
    dq,
    dq_extra,
    dk,
    dvv,
):
    nbh, lq, d = q.shape
    lk = k.shape[1]
    dv = v.shape[2]
    bq = max(1, min(bq, lq))  # tile buffers no larger than the problem (the tile counts, and
    bk = max(1, min(bk, lk))  # so the caller's chunking of key tiles, are unchanged by this)
    nqt = (lq + bq - 1) // bq
    nkt = (lk + bk - 1) // bk
    ncomp = ptr.shape[0] - 1
    for w in prange(ncomp * nchunks):
        comp = w // nchunks
        t = w % nchunks
        dqt = dq if t == 0 else dq_extra[t - 1]
        p = np.empty((bq, bk), q.dtype)
        ds = np.empty((bq, bk), q.dtype)
        for jt in range(t * nkt // nchunks, (t + 1) * nkt // nchunks):
            j0 = jt * bk
            j1 = min(j0 + bk, lk)
            nk = j1 - j0
            for mi in range(ptr[comp], ptr[comp + 1]):
                bh = members[mi]
                kv = bh // groups
                moff = moffs[bh] if has_mask else 0
                boff = boffs[bh] if has_bias else 0
                for it in range(nqt):
                    i0 = it * bq
                    i1 = min(i0 + bq, lq)
                    ni = i1 - i0
                    if causal and j0 > i1 - 1 + coff:
                        continue
                    if has_mask and _tile_all_masked(mflat, moff, mrs, mcs, i0, i1, j0, j1):
                        continue
                    cross = causal and j1 - 1 > i0 + coff
                    gemm(
                        False,
                        True,
                        ni,
                        nk,
                        d,
                        alpha2,
                        q,
                        (bh * lq + i0) * d,
                        d,
                        k,
                        (kv * lk + j0) * d,
                        d,
                        0.0,
                        p,
                        0,
                        bk,
                    )
                    for r in range(ni):
                        prow = p[r]
                        _row_logits(
                            prow,
                            nk,
                            i0 + r,
                            j0,
                            log2e,
                            ninf,
                            has_mask,
                            mflat,
                            moff,
                            mrs,
                            mcs,
                            has_bias,
                            bflat,
                            boff,
                            brs,
                            bcs,
                            cross,
                            coff,
                        )
                        _row_exp2(prow, nk, lse2[bh, i0 + r])
                    # dP = dO_i V_jᵀ, then dS = P ⊙ (dP − D_i) in place
                    gemm(
                        False,
                        True,
                        ni,
                        nk,
                        dv,
                        1.0,
                        do,
                        (bh * lq + i0) * dv,
                        dv,
                        v,
                        (kv * lk + j0) * dv,
                        dv,
                        0.0,
                        ds,
                        0,
                        bk,
                    )
                    for r in range(ni):
                        prow = p[r]
                        srow = ds[r]
                        dl = delta[bh, i0 + r]
                        for c in range(nk):
                            srow[c] = prow[c] * (srow[c] - dl)
                        if has_bias:
                            base = boff + (i0 + r) * brs + j0 * bcs
                            for c in range(nk):
                                dbflat[base + c * bcs] += srow[c]
                    # dV_j += Pᵀ dO_i ; dK_j += scale dSᵀ Q_i ; dQ_i += scale dS K_j
                    gemm(
                        True,
                        False,
                        nk,
                        dv,
                        ni,
                        1.0,
                        p,
                        0,
                        bk,
                        do,
                        (bh * lq + i0) * dv,
                        dv,
                        1.0,
                        dvv,
                        (kv * lk + j0) * dv,
                        dv,
                    )
                    gemm(
                        True,
                        False,
                        nk,
                        d,
                        ni,
                        scale,
                        ds,
                        0,
                        bk,
                        q,
                        (bh * lq + i0) * d,
                        d,
                        1.0,
                        dk,
                        (kv * lk + j0) * d,
                        d,
                    )
                    gemm(
                        False,
                        False,
                        ni,
                        d,
                        nk,
                        scale,
                        ds,
                        0,
                        bk,
                        k,
                        (kv * lk + j0) * d,
                        d,
                        1.0,
                        dqt,
                        (bh * lq + i0) * d,
                        d,
                    )


# -- Python side -----------------------------------------------------------------------------------


def _as3(x, lead):
    """``x`` (..., L, w) as a C-contiguous (prod(...), L, w) array (a view when it already is)."""
    return np.ascontiguousarray(x).reshape((lead,) + tuple(x.shape[-2:]))


def _broadcast_plan(a, batch, lq, lk, dtype=None):
    """A mask/bias broadcastable to batch + (lq, lk) as (flat data, per-head offsets, row stride,
    column stride) in elements, reading the caller's array without materialising the broadcast."""
    data = np.ascontiguousarray(a, dtype=dtype)
    full = batch + (lq, lk)
    data_nd = data.reshape((1,) * (len(full) - data.ndim) + data.shape)
    view = np.broadcast_to(data_nd, full)
    strides = [s // data.itemsize if n > 1 else 0 for s, n in zip(view.strides, full, strict=True)]
    offs = np.zeros(batch, dtype=np.int64)
    for axis, (n, st) in enumerate(zip(batch, strides[:-2], strict=True)):
        shape = [1] * len(batch)
        shape[axis] = n
        offs = offs + (np.arange(n, dtype=np.int64) * st).reshape(shape)
    return data.reshape(-1), offs.reshape(-1), strides[-2], strides[-1], data


_NO_MASK = np.zeros(1, dtype=np.bool_)
_NO_OFFS = np.zeros(1, dtype=np.int64)


def _plans(mask, bias, causal, q, k):
    batch = tuple(q.shape[:-2])
    lq, lk = q.shape[-2], k.shape[-2]
    cdt = q.dtype
    coff = 0 if causal is None or causal == "top_left" else lk - lq
    if mask is not None:
        mflat, moffs, mrs, mcs, _ = _broadcast_plan(
            mask.astype(np.bool_, copy=False), batch, lq, lk
        )
    else:
        mflat, moffs, mrs, mcs = _NO_MASK, _NO_OFFS, 0, 0
    if bias is not None:
        bflat, boffs, brs, bcs, bdata = _broadcast_plan(bias, batch, lq, lk, cdt)
    else:
        bflat, boffs, brs, bcs, bdata = np.zeros(1, cdt), _NO_OFFS, 0, 0, None
    return dict(
        batch=batch,
        lq=lq,
        lk=lk,
        cdt=cdt,
        causal=causal is not None,
        coff=coff,
        mask=(mask is not None, mflat, moffs, mrs, mcs),
        bias=(bias is not None, bflat, boffs, brs, bcs),
        bdata=bdata,
    )


def sdpa_forward(q, k, v, *, mask=None, bias=None, causal=None, scale, gqa_groups=1, blocks=None):
    """(out, lse) like the reference ``sdpa_forward`` for float32/float64 NumPy inputs."""
    o = _plans(mask, bias, causal, q, k)
    cdt = o["cdt"].type
    nb = math.prod(o["batch"])
    lq, dv = o["lq"], v.shape[-1]
    q3 = _as3(q, nb)
    k3 = _as3(k, nb // gqa_groups if nb else 0)
    v3 = _as3(v, nb // gqa_groups if nb else 0)
    out = np.empty((nb, lq, dv), dtype=cdt)
    lse = np.empty((nb, lq), dtype=cdt)
    bq, bk = blocks or FWD_BLOCKS
    if nb and lq:
        with single_threaded_blas():
            _fwd_kernel(
                q3,
                k3,
                v3,
                gqa_groups,
                cdt(scale * LOG2E),
                cdt(LOG2E),
                cdt(-np.inf),
                *o["mask"],
                *o["bias"],
                o["causal"],
                o["coff"],
                bq,
                bk,
                out,
                lse,
            )
    return out.reshape(o["batch"] + (lq, dv)), lse.reshape(o["batch"] + (lq,))


def _components(nb, groups, boffs):
    """Partition the heads so that heads sharing a kv head or a bias slice are in one group."""
    parent = list(range(nb))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for bh in range(nb):
        union(bh, (bh // groups) * groups)
    if boffs is not None:
        first = {}
        for bh, off in enumerate(boffs.tolist()):
            union(bh, first.setdefault(off, bh))
    comps: dict[int, list[int]] = {}
    for bh in range(nb):
        comps.setdefault(find(bh), []).append(bh)
    groups_ = [comps[r] for r in sorted(comps)]
    members = np.array([bh for g in groups_ for bh in g], dtype=np.int64)
    ptr = np.cumsum([0] + [len(g) for g in groups_]).astype(np.int64)
    return members, ptr


def sdpa_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    dlse=None,
    *,
    mask=None,
    bias=None,
    causal=None,
    scale,
    gqa_groups=1,
    blocks=None,
):
    """(dq, dk, dv, dbias) like the reference ``sdpa_backward``."""
    o = _plans(mask, bias, causal, q, k)
    cdt = o["cdt"].type
    nb = math.prod(o["batch"])
    nkv = nb // gqa_groups if nb else 0
    lq, lk, d, dv = o["lq"], o["lk"], q.shape[-1], v.shape[-1]
    q3, do3 = _as3(q, nb), _as3(dout.astype(cdt, copy=False), nb)
    k3, v3 = _as3(k, nkv), _as3(v, nkv)
    o3 = _as3(out, nb)
    delta = np.einsum("bij,bij->bi", do3, o3)
    if dlse is not None:
        delta -= dlse.astype(cdt, copy=False).reshape(nb, lq)
    lse2 = lse.astype(cdt, copy=False).reshape(nb, lq) * cdt(LOG2E)
    bq, bk = blocks or BWD_BLOCKS
    nkt = -(-lk // bk)
    has_bias, bflat, boffs, brs, bcs = o["bias"]
    members, ptr = _components(nb, gqa_groups, boffs if has_bias else None)
    ncomp = len(ptr) - 1
    nchunks = max(1, min(nkt, -(-MIN_BWD_ITEMS // max(ncomp, 1))))
    if has_bias and bcs == 0:
        nchunks = 1  # every key tile of a row writes the same dbias element
    dq = np.zeros((nb, lq, d), dtype=cdt)
    dq_extra = np.zeros(
        (max(nchunks - 1, 0), nb, lq, d) if nchunks > 1 else (1, 1, 1, 1), dtype=cdt
    )
    dk = np.zeros((nkv, lk, d), dtype=cdt)
    dvv = np.zeros((nkv, lk, dv), dtype=cdt)
    dbias_data = np.zeros(o["bdata"].shape, dtype=cdt) if has_bias else None
    dbflat = dbias_data.reshape(-1) if has_bias else np.zeros(1, cdt)
    if nb and lq and lk:
        with single_threaded_blas():
            _bwd_kernel(
                q3,
                k3,
                v3,
                do3,
                lse2,
                delta,
                gqa_groups,
                cdt(scale * LOG2E),
                cdt(scale),
                cdt(LOG2E),
                cdt(-np.inf),
                *o["mask"],
                has_bias,
                bflat,
                boffs,
                brs,
                bcs,
                dbflat,
                o["causal"],
                o["coff"],
                bq,
                bk,
                members,
                ptr,
                nchunks,
                dq,
                dq_extra,
                dk,
                dvv,
            )
    for t in range(nchunks - 1):
        dq += dq_extra[t]
    del dq_extra
    dbias = None
    if has_bias:
        dbias = dbias_data.reshape(bias.shape).astype(bias.dtype, copy=False)
    return (
        dq.reshape(q.shape),
        dk.reshape(k.shape),
        dvv.reshape(v.shape),
        dbias,
    )


# -- Kernel ----------------------------------------------------------------------------------------


# The kernel runs in the SDPA convention of arrayattn._glue.attention (the op adapts it).
KERNELS = {
    "scaled_dot_product_attention": Kernel(sdpa_forward, sdpa_backward, requires=(BLAS,)),
}

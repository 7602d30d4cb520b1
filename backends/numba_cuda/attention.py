"""Numba-CUDA kernels of scaled dot-product attention: FlashAttention-2 forward and backward.

Layout: ``q`` is viewed as (B, Lq, d) with B the flattened batch·heads, ``k``/``v`` as
(B / groups, Lk, ·) (grouped-query attention: query head ``b`` reads kv head ``b // groups``).
Masks and biases are read through their broadcast strides (:func:`._common.broadcast_plan`), never
materialised at (B, Lq, Lk).

Forward (FA2 Alg. 1): one thread block per (batch·head, query tile of ``BQ`` rows), one thread per
query row. The block stages each key/value tile of ``BK`` rows in shared memory; every thread keeps
its query row, its output accumulator and the running max/sum of the online softmax in registers
(local arrays) and saves ``lse = m + log l`` (``+inf`` for a row with nothing to attend to).

Backward (FA2 Alg. 2), deterministic and without atomics:

1. ``D = rowsum(dO ⊙ O) - dlse`` (one thread per row);
2. dK/dV: one block per (kv head, key tile), one thread per key row; the block loops over the
   query heads of its GQA group and over the query tiles (staged in shared memory with their
   ``lse`` and ``D``), recomputes ``p = exp(s - lse)`` and accumulates ``dV_j += p dO_i``,
   ``dK_j += scale·dS_ij q_i`` in registers;
3. dQ: one block per (batch·head, query tile), one thread per query row, looping over key tiles;
   with a bias it also writes each key tile's ``dS`` summed over what the bias broadcasts inside
   the block (a tree over the rows, key-ordered sums over the columns) to partials;
4. dbias (only with a bias): ``dbias_reduce`` sums, for each element of the bias *as given*,
   the partials of the query heads (and query tiles) that read it, a fixed-shape tree per
   element (``_common.dbias_plan``): O(B·H·Lq·Lk) whatever the bias shape.

Every kernel is specialised (and compiled once) per (dtype, d, dv, BQ, BK) so register arrays and
shared tiles have compile-time sizes. float32 and float64 run on CUDA cores; half precision is the
``cupy`` backend's job.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from arrayattn._kernel import Kernel, requirement

from ._common import (
    as_lib,
    broadcast_plan,
    caller_stream,
    dbias_plan,
    launch,
    lib_of,
    nblocks,
    numba_dtype,
    on_inputs_device,
)

__all__ = ["KERNELS", "sdpa_backward", "sdpa_forward", "tile_sizes"]

#: Query rows per block (= threads per block) and the most key rows per shared tile.
BLOCK_Q = 64
BLOCK_K = 32
#: Static shared memory per block is limited to 48 KiB; tiles are sized to stay below this.
SHARED_BYTES = 40 * 1024
#: Threads per block of the bias-gradient reduction.
REDUCE_THREADS = 256


def tile_sizes(d: int, dv: int, itemsize: int) -> tuple[int, int]:
    """(BQ, BK) for the module settings; BK shrinks so that the largest block's shared memory
    fits: a K and a V tile, and the dQ kernel's dS tile (BK x (BQ + 1)) and row sums (BQ)."""
    per_row = (max(1, d + dv) + BLOCK_Q + 1) * itemsize
    return BLOCK_Q, max(1, min(BLOCK_K, (SHARED_BYTES - BLOCK_Q * itemsize) // per_row))


def _kernels(dtype, d, dv, bq, bk):
    """The compiled kernels for these sizes (compiled once per process, then reused)."""
    return _build(np.dtype(dtype), d, dv, bq, bk)


@functools.cache
def _build(npdtype, d, dv, bq, bk):
    nbt = numba_dtype(npdtype)
    cast = npdtype.type
    ninf = cast(-np.inf)
    inf = cast(np.inf)
    zero = cast(0.0)
    one = cast(1.0)
    dd = max(d, 1)  # register arrays need a positive size (d = 0 is legal: every logit is 0)
    ddv = max(dv, 1)

    @cuda.jit(device=True, inline=True)
    def _keep(i, j, causal, coff, has_mask, mflat, moff, mrs, mcs):
        if causal and j > i + coff:
            return False
        if has_mask and not mflat[moff + i * mrs + j * mcs]:
            return False
        return True

    @cuda.jit
    def fwd(
        q,
        k,
        v,
        groups,
        scale,
        causal,
        coff,
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
        out,
        lse,
    ):
        lq = q.shape[1]
        lk = k.shape[1]
        nqt = (lq + bq - 1) // bq
        bh = cuda.blockIdx.x // nqt
        i0 = (cuda.blockIdx.x % nqt) * bq
        tid = cuda.threadIdx.x
        i = i0 + tid
        kvh = bh // groups
        moff = moffs[bh] if has_mask else 0
        boff = boffs[bh] if has_bias else 0
        ks = cuda.shared.array((bk, dd), nbt)
        vs = cuda.shared.array((bk, ddv), nbt)
        qi = cuda.local.array(dd, nbt)
        acc = cuda.local.array(ddv, nbt)
        s = cuda.local.array(bk, nbt)
        valid = i < lq
        for c in range(d):
            qi[c] = q[bh, i, c] if valid else zero
        for c in range(dv):
            acc[c] = zero
        m = ninf
        ell = zero
        last = min(i0 + bq, lq) - 1
        for j0 in range(0, lk, bk):
            if causal and j0 > last + coff:
                break  # uniform over the block: this and every later tile lie past the diagonal
            nk = min(bk, lk - j0)
            cuda.syncthreads()
            for e in range(tid, nk * d, bq):
                ks[e // d, e % d] = k[kvh, j0 + e // d, e % d]
            for e in range(tid, nk * dv, bq):
                vs[e // dv, e % dv] = v[kvh, j0 + e // dv, e % dv]
            cuda.syncthreads()
            if valid:
                mt = ninf
                for r in range(nk):
                    j = j0 + r
                    x = ninf
                    if _keep(i, j, causal, coff, has_mask, mflat, moff, mrs, mcs):
                        x = zero
                        for c in range(d):
                            x += qi[c] * ks[r, c]
                        x *= scale
                        if has_bias:
                            x += bflat[boff + i * brs + j * bcs]
                    s[r] = x
                    if x > mt:
                        mt = x
                m_new = max(m, mt)
                m_use = zero if m_new == ninf else m_new
                corr = math.exp(m - m_use)
                tot = zero
                for r in range(nk):
                    p = math.exp(s[r] - m_use)
                    s[r] = p
                    tot += p
                ell = ell * corr + tot
                for c in range(dv):
                    a = acc[c] * corr
                    for r in range(nk):
                        a += s[r] * vs[r, c]
                    acc[c] = a
                m = m_new
        if valid:
            if ell == zero:
                for c in range(dv):
                    out[bh, i, c] = zero
                lse[bh, i] = inf
            else:
                inv = one / ell
                for c in range(dv):
                    out[bh, i, c] = acc[c] * inv
                lse[bh, i] = m + math.log(ell)

    @cuda.jit
    def delta_kernel(do, o, dlse, has_dlse, delta):
        t = cuda.grid(1)
        lq = do.shape[1]
        if t < do.shape[0] * lq:
            bh = t // lq
            i = t % lq
            acc = zero
            for c in range(do.shape[2]):
                acc += do[bh, i, c] * o[bh, i, c]
            if has_dlse:
                acc -= dlse[bh, i]
            delta[bh, i] = acc

    @cuda.jit(device=True, inline=True)
    def _prob(
        qrow_dot_k,
        i,
        j,
        scale,
        lse_i,
        causal,
        coff,
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
    ):
        """p_ij = exp(scale q_i·k_j + b_ij - lse_i), exactly 0 where masked or the row is empty."""
        if not _keep(i, j, causal, coff, has_mask, mflat, moff, mrs, mcs):
            return zero
        x = qrow_dot_k * scale
        if has_bias:
            x += bflat[boff + i * brs + j * bcs]
        return math.exp(x - lse_i)

    @cuda.jit
    def dkdv(
        q,
        k,
        v,
        do,
        lse,
        delta,
        groups,
        scale,
        causal,
        coff,
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
        dk,
        dvv,
    ):
        # one thread per key row; block = (kv head, key tile of bq rows); query tiles of bk rows
        lq = q.shape[1]
        lk = k.shape[1]
        nkt = (lk + bq - 1) // bq
        kvh = cuda.blockIdx.x // nkt
        j0 = (cuda.blockIdx.x % nkt) * bq
        tid = cuda.threadIdx.x
        j = j0 + tid
        valid = j < lk
        qs = cuda.shared.array((bk, dd), nbt)
        dos = cuda.shared.array((bk, ddv), nbt)
        ls = cuda.shared.array(bk, nbt)
        ds_ = cuda.shared.array(bk, nbt)
        kj = cuda.local.array(dd, nbt)
        vj = cuda.local.array(ddv, nbt)
        dkj = cuda.local.array(dd, nbt)
        dvj = cuda.local.array(ddv, nbt)
        for c in range(d):
            kj[c] = k[kvh, j, c] if valid else zero
            dkj[c] = zero
        for c in range(dv):
            vj[c] = v[kvh, j, c] if valid else zero
            dvj[c] = zero
        for g in range(groups):
            bh = kvh * groups + g
            moff = moffs[bh] if has_mask else 0
            boff = boffs[bh] if has_bias else 0
            for i0 in range(0, lq, bk):
                ni = min(bk, lq - i0)
                if causal and j0 > i0 + ni - 1 + coff:
                    continue  # uniform over the block: every key of the tile lies past every query
                cuda.syncthreads()
                for e in range(tid, ni * d, bq):
                    qs[e // d, e % d] = q[bh, i0 + e // d, e % d]
                for e in range(tid, ni * dv, bq):
                    dos[e // dv, e % dv] = do[bh, i0 + e // dv, e % dv]
                for e in range(tid, ni, bq):
                    ls[e] = lse[bh, i0 + e]
                    ds_[e] = delta[bh, i0 + e]
                cuda.syncthreads()
                if valid:
                    for r in range(ni):
                        i = i0 + r
                        x = zero
                        for c in range(d):
                            x += qs[r, c] * kj[c]
                        p = _prob(
                            x,
                            i,
                            j,
                            scale,
                            ls[r],
                            causal,
                            coff,
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
                        )
                        if p != zero:
                            dp = zero
                            for c in range(dv):
                                dvj[c] += p * dos[r, c]
                                dp += dos[r, c] * vj[c]
                            dsv = p * (dp - ds_[r])
                            for c in range(d):
                                dkj[c] += dsv * qs[r, c]
        if valid:
            for c in range(d):
                dk[kvh, j, c] = dkj[c] * scale
            for c in range(dv):
                dvv[kvh, j, c] = dvj[c]

    @cuda.jit(device=True)
    def _ds_tile_out(tile, nk, j0, rowsum, part, db_rows, db_cols, bhl, qt, nqt, i0, lq, lk):
        """One key tile of dS, tile[r, t] for key r < nk and row t of the block (0 past lq),
        summed over what the bias broadcasts inside the block and written to the partials
        (laid out (bh - bh0, PR, PC), see ``_common.dbias_plan``). Called by the whole block."""
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # the tile is complete
        if db_cols and db_rows:
            for e in range(tid, bq * nk, bq):  # consecutive threads, consecutive keys
                t = e // nk
                r = e % nk
                if i0 + t < lq:
                    part[(bhl * lq + i0 + t) * lk + j0 + r] = tile[r, t]
        elif db_cols:  # the bias broadcasts rows: a tree over the block's rows
            s = bq // 2
            while s > 0:
                for e in range(tid, s * nk, bq):
                    t = e // nk
                    r = e % nk
                    tile[r, t] += tile[r, t + s]
                cuda.syncthreads()
                s //= 2
            for r in range(tid, nk, bq):
                part[(bhl * nqt + qt) * lk + j0 + r] = tile[r, 0]
        else:  # the bias broadcasts columns: each row's sum, in key order across the tiles
            acc = zero
            for r in range(nk):
                acc += tile[r, tid]
            rowsum[tid] += acc
        cuda.syncthreads()  # the tile may be overwritten

    @cuda.jit(device=True)
    def _ds_rows_out(rowsum, part, db_rows, bhl, qt, nqt, i0, lq):
        """After the last key tile, where the bias broadcasts columns: the row sums (a tree
        over the rows where it broadcasts rows too). Called by the whole block."""
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if db_rows:
            if i0 + tid < lq:
                part[bhl * lq + i0 + tid] = rowsum[tid]
        else:
            s = bq // 2
            while s > 0:
                if tid < s:
                    rowsum[tid] += rowsum[tid + s]
                cuda.syncthreads()
                s //= 2
            if tid == 0:
                part[bhl * nqt + qt] = rowsum[0]

    @cuda.jit
    def dq_kernel(
        q,
        k,
        v,
        do,
        lse,
        delta,
        groups,
        scale,
        causal,
        coff,
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
        bh0,
        dpart,
        db_on,
        db_rows,
        db_cols,
        dq,
    ):
        # blocks for query heads bh0, bh0 + 1, ...; with db_on each key tile's dS goes to the
        # bias-gradient partials dpart
        lq = q.shape[1]
        lk = k.shape[1]
        nqt = (lq + bq - 1) // bq
        bhl = cuda.blockIdx.x // nqt
        qt = cuda.blockIdx.x % nqt
        bh = bh0 + bhl
        i0 = qt * bq
        tid = cuda.threadIdx.x
        i = i0 + tid
        kvh = bh // groups
        moff = moffs[bh] if has_mask else 0
        boff = boffs[bh] if has_bias else 0
        valid = i < lq
        ks = cuda.shared.array((bk, dd), nbt)
        vs = cuda.shared.array((bk, ddv), nbt)
        dst = cuda.shared.array((bk, bq + 1), nbt)
        rowsum = cuda.shared.array(bq, nbt)
        qi = cuda.local.array(dd, nbt)
        doi = cuda.local.array(ddv, nbt)
        dqi = cuda.local.array(dd, nbt)
        for c in range(d):
            qi[c] = q[bh, i, c] if valid else zero
            dqi[c] = zero
        for c in range(dv):
            doi[c] = do[bh, i, c] if valid else zero
        rowsum[tid] = zero
        lse_i = lse[bh, i] if valid else inf
        dl = delta[bh, i] if valid else zero
        last = min(i0 + bq, lq) - 1
        for j0 in range(0, lk, bk):
            if causal and j0 > last + coff:
                break
            nk = min(bk, lk - j0)
            cuda.syncthreads()
            for e in range(tid, nk * d, bq):
                ks[e // d, e % d] = k[kvh, j0 + e // d, e % d]
            for e in range(tid, nk * dv, bq):
                vs[e // dv, e % dv] = v[kvh, j0 + e // dv, e % dv]
            cuda.syncthreads()
            for r in range(nk):
                dsv = zero
                if valid:
                    j = j0 + r
                    x = zero
                    for c in range(d):
                        x += qi[c] * ks[r, c]
                    p = _prob(
                        x,
                        i,
                        j,
                        scale,
                        lse_i,
                        causal,
                        coff,
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
                    )
                    if p != zero:
                        dp = zero
                        for c in range(dv):
                            dp += doi[c] * vs[r, c]
                        dsv = p * (dp - dl)
                        for c in range(d):
                            dqi[c] += dsv * ks[r, c]
                if db_on:
                    dst[r, tid] = dsv
            if db_on:
                _ds_tile_out(dst, nk, j0, rowsum, dpart, db_rows, db_cols, bhl, qt, nqt, i0, lq, lk)
        if db_on and not db_cols:
            _ds_rows_out(rowsum, dpart, db_rows, bhl, qt, nqt, i0, lq)
        if valid:
            for c in range(d):
                dq[bh, i, c] = dqi[c] * scale

    @cuda.jit
    def dbias_reduce(
        part, pr_n, pc_n, db_rows, db_cols, hptr, hbh, nrows, ncols, lanes, accumulate, dbias
    ):
        """dbias[e] = the partials reading bias element e (every query head of its bias head,
        every query tile where the bias broadcasts rows): ``lanes`` threads per element sum a
        fixed strided subset each, then a tree in shared memory."""
        sh = cuda.shared.array(REDUCE_THREADS, nbt)
        tid = cuda.threadIdx.x
        lane = tid % lanes
        e = cuda.blockIdx.x * (REDUCE_THREADS // lanes) + tid // lanes
        size = dbias.shape[0]
        s = zero
        if e < size:
            head = e // (nrows * ncols)
            r = (e // ncols) % nrows
            c = e % ncols if db_cols else 0
            h0 = hptr[head]
            per = 1 if db_rows else pr_n
            for u in range(lane, (hptr[head + 1] - h0) * per, lanes):
                pr = r if db_rows else u % per
                s += part[(hbh[h0 + u // per] * pr_n + pr) * pc_n + c]
        sh[tid] = s
        w = lanes // 2
        while w > 0:
            cuda.syncthreads()
            if lane < w:
                sh[tid] += sh[tid + w]
            w //= 2
        if lane == 0 and e < size:
            dbias[e] = (dbias[e] if accumulate else zero) + sh[tid]

    return {
        "fwd": fwd,
        "delta": delta_kernel,
        "dkdv": dkdv,
        "dq": dq_kernel,
        "dbias_reduce": dbias_reduce,
    }


# -- launchers (device arrays in, device arrays out; NumPy arrays under the simulator) ----------


def _as3(lib, x, lead):
    return lib.ascontiguousarray(x).reshape((lead,) + tuple(x.shape[-2:]))


def _plans(lib, mask, bias, batch, lq, lk, dtype):
    if mask is not None:
        mflat, moffs, mrs, mcs, _ = broadcast_plan(lib, mask, batch, lq, lk, dtype=bool)
    else:
        mflat, moffs, mrs, mcs = lib.zeros(1, dtype=bool), lib.zeros(1, dtype=np.int64), 0, 0
    if bias is not None:
        bplan = broadcast_plan(lib, bias, batch, lq, lk, dtype=dtype)
    else:
        z = lib.zeros(1, dtype=dtype)
        bplan = (z, lib.zeros(1, dtype=np.int64), 0, 0, None)
    return (mask is not None, mflat, moffs, mrs, mcs), (bias is not None,) + bplan


def _coff(causal, lq, lk):
    return 0 if causal in (None, "top_left") else lk - lq


@on_inputs_device
def sdpa_forward(q, k, v, *, mask=None, bias=None, causal=None, scale, gqa_groups=1, blocks=None):
    """``(out, lse)`` like the reference ``sdpa_forward`` for float32/float64 device arrays."""
    q, k, v, mask, bias = (as_lib(a) for a in (q, k, v, mask, bias))
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-2])
    nb = math.prod(batch)
    nkv = nb // gqa_groups
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    out = lib.empty((nb, lq, dv), dtype=dtype)
    lse = lib.empty((nb, lq), dtype=dtype)
    if nb and lq:
        bq, bk = blocks or tile_sizes(d, dv, dtype.itemsize)
        kern = _kernels(dtype, d, dv, bq, bk)["fwd"]
        m, b = _plans(lib, mask, bias, batch, lq, lk, dtype)
        launch(
            kern,
            nb * nblocks(lq, bq),
            bq,
            caller_stream(lib),
            _as3(lib, q, nb),
            _as3(lib, k, nkv),
            _as3(lib, v, nkv),
            gqa_groups,
            dtype.type(scale),
            causal is not None,
            _coff(causal, lq, lk),
            *m,
            *b[:5],
            out,
            lse,
        )
    return out.reshape(batch + (lq, dv)), lse.reshape(batch + (lq,))


@on_inputs_device
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
    """``(dq, dk, dv, dbias)`` like the reference ``sdpa_backward``."""
    q, k, v, out, lse, dout, dlse, mask, bias = (
        as_lib(a) for a in (q, k, v, out, lse, dout, dlse, mask, bias)
    )
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-2])
    nb = math.prod(batch)
    nkv = nb // gqa_groups
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    dq = lib.zeros((nb, lq, d), dtype=dtype)
    dk = lib.zeros((nkv, lk, d), dtype=dtype)
    dvv = lib.zeros((nkv, lk, dv), dtype=dtype)
    m, b = _plans(lib, mask, bias, batch, lq, lk, dtype)
    dbias = None
    if bias is not None:
        dbias = lib.zeros(b[5].size, dtype=dtype)
    if nb and lq and lk:
        bq, bk = blocks or tile_sizes(d, dv, dtype.itemsize)
        kerns = _kernels(dtype, d, dv, bq, bk)
        q3, k3, v3 = _as3(lib, q, nb), _as3(lib, k, nkv), _as3(lib, v, nkv)
        do3 = _as3(lib, dout.astype(dtype, copy=False), nb)
        o3 = _as3(lib, out.astype(dtype, copy=False), nb)
        lse2 = lib.ascontiguousarray(lse.astype(dtype, copy=False)).reshape(nb, lq)
        has_dlse = dlse is not None
        dl2 = (
            lib.ascontiguousarray(dlse.astype(dtype, copy=False)).reshape(nb, lq)
            if has_dlse
            else lib.zeros((1, 1), dtype=dtype)
        )
        delta = lib.empty((nb, lq), dtype=dtype)
        nthreads = 128
        stream = caller_stream(lib)
        launch(
            kerns["delta"],
            nblocks(nb * lq, nthreads),
            nthreads,
            stream,
            do3,
            o3,
            dl2,
            has_dlse,
            delta,
        )
        common = (
            q3,
            k3,
            v3,
            do3,
            lse2,
            delta,
            gqa_groups,
            dtype.type(scale),
            causal is not None,
            _coff(causal, lq, lk),
            *m,
        )
        launch(kerns["dkdv"], nkv * nblocks(lk, bq), bq, stream, *common, *b[:5], dk, dvv)
        plan = None
        if bias is not None and dbias.size:
            plan = dbias_plan(b[5].shape, batch, lq, lk, bq, dtype.itemsize)
        chunks = plan.chunks if plan is not None else ((0, nb, None, None),)
        part = None
        if plan is not None and not plan.direct:
            most = max(bh1 - bh0 for bh0, bh1, _, _ in chunks)
            part = lib.empty(most * plan.pr * plan.pc, dtype=dtype)
        nqt = nblocks(lq, bq)
        for n, (bh0, bh1, hptr, hbh) in enumerate(chunks):
            if plan is None:
                db = (lib.zeros(1, dtype=dtype), False, False, False)
            else:
                if part is not None:
                    part.fill(0)  # causally skipped keys contribute zeros
                db = (dbias if plan.direct else part, True, plan.rows, plan.cols)
            launch(kerns["dq"], (bh1 - bh0) * nqt, bq, stream, *common, *b[:5], bh0, *db, dq)
            if part is not None:
                per_block = REDUCE_THREADS // plan.lanes
                launch(
                    kerns["dbias_reduce"],
                    nblocks(dbias.size, per_block),
                    REDUCE_THREADS,
                    stream,
                    part,
                    plan.pr,
                    plan.pc,
                    plan.rows,
                    plan.cols,
                    lib.asarray(hptr),
                    lib.asarray(hbh),
                    plan.nrows,
                    plan.ncols,
                    plan.lanes,
                    n > 0,
                    dbias,
                )
    if bias is not None:
        dbias = dbias.reshape(bias.shape).astype(bias.dtype, copy=False)
    return (
        dq.reshape(q.shape).astype(q.dtype, copy=False),
        dk.reshape(k.shape).astype(k.dtype, copy=False),
        dvv.reshape(v.shape).astype(v.dtype, copy=False),
        dbias,
    )


# -- Kernel ------------------------------------------------------------------------------------


@requirement("d + dv fit one shared-memory tile row")
def _head_widths(call):
    q, v = call.arrays["q"], call.arrays["v"]
    width = q.shape[-1] + v.shape[-1]
    if (width + 2 * BLOCK_Q + 1) * np.dtype(q.dtype).itemsize > SHARED_BYTES:
        return f"head widths d + dv = {width} exceed one shared-memory tile row"
    return None


# The kernel runs in the SDPA convention of arrayattn._glue.attention (the op adapts it).
# float16/bfloat16 are the cupy backend's (tensor cores).
KERNELS = {
    "scaled_dot_product_attention": Kernel(sdpa_forward, sdpa_backward, requires=(_head_widths,))
}

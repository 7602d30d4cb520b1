"""CuPy launchers of ``attention.cu``: scaled dot-product attention forward and backward.

float32/float64 run the CUDA-core kernels (float64 accumulates in float64); float16 (and bfloat16
where the array library has it) with head widths up to 128 run forward and backward on tensor
cores (``sdpa_fwd_wmma``, ``sdpa_dkdv_wmma``, ``sdpa_dq_wmma``: float32 accumulation; ``P`` and
``dS`` rounded to the input dtype for the products, as FlashAttention-2 does), wider heads on
CUDA cores with float32 accumulation. The bias gradient is emitted by the dQ kernels (dS summed
over what the bias broadcasts within a block) and reduced by ``sdpa_dbias_reduce``: O(B·H·Lq·Lk)
whatever the bias shape. The module is compiled on first use (``cupy.RawModule`` with
``name_expressions``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from arrayattn._kernel import Kernel, requirement

from . import _module
from ._module import function, in_shared, on_inputs_device

__all__ = [
    "KERNELS",
    "NAME_EXPRESSIONS",
    "SOURCE",
    "cuda_core_blocks",
    "sdpa_backward",
    "sdpa_forward",
]

SOURCE = "attention.cu"
#: Row-vector widths the CUDA-core kernels are instantiated for (d and dv <= DMAX).
DMAXES = (32, 64, 128, 256)
#: Padded head widths of the tensor-core kernels.
WMMA_DPS = (32, 64, 128)
_CTYPES = {
    "float32": ("float", "float"),
    "float64": ("double", "double"),
    "float16": ("__half", "float"),
    "bfloat16": ("__nv_bfloat16", "float"),
}
_HALF = ("float16", "bfloat16")
BLOCK_K = 32  # most key (or query) rows of a staged tile of the CUDA-core kernels
#: Shared memory of a CUDA-core block with its row vectors in registers (no opt-in needed);
#: those with shared row vectors may use the device's opt-in maximum.
SHARED_BYTES = _module.DEFAULT_SHARED
WMMA_BQ, WMMA_BK = 64, 32
WMMA_KEYS, WMMA_QB = 64, 32  # key rows per block and staged query rows of sdpa_dkdv_wmma
#: Row vectors per thread of each CUDA-core kernel: q and the output accumulator; q, dO and
#: dq; k, v, dk and dv.
_VECTORS = {"sdpa_fwd": 2, "sdpa_dq": 3, "sdpa_dkdv": 4}
REDUCE_THREADS = 256


def shared_vectors(kernel: str, acc: str, dmax: int) -> bool:
    """Whether the CUDA-core ``kernel`` keeps its row vectors in shared memory at ``dmax``."""
    return in_shared(_VECTORS[kernel], acc, dmax)


def _cuda_core_expr(kernel, t, acc, dmax):
    return f"{kernel}<{t}, {acc}, {dmax}, {str(shared_vectors(kernel, acc, dmax)).lower()}>"


def _exprs() -> tuple[str, ...]:
    out = [f"sdpa_dbias_reduce<{acc}>" for acc in ("float", "double")]
    for t, acc in _CTYPES.values():
        out.append(f"sdpa_delta<{t}, {acc}>")
        for dmax in DMAXES:
            out += [_cuda_core_expr(kernel, t, acc, dmax) for kernel in _VECTORS]
    for name in _HALF:
        t = _CTYPES[name][0]
        for kernel in ("sdpa_fwd_wmma", "sdpa_dkdv_wmma", "sdpa_dq_wmma"):
            out += [f"{kernel}<{t}, {dp}>" for dp in WMMA_DPS]
    return tuple(out)


NAME_EXPRESSIONS = _exprs()


#: The compute capability the wmma fragments of each element type need.
_WMMA_MIN_CC = {"__half": 70, "__nv_bfloat16": 80}


def _compiles_on(expr, cc):
    """Whether an instantiation compiles for compute capability ``cc`` (only wmma ones may not)."""
    if "_wmma<" not in expr:
        return True
    return cc >= _WMMA_MIN_CC[expr.split("<", 1)[1].split(",", 1)[0]]


@functools.cache
def _device_exprs(cc):
    """The instantiations of the module for a device: a bfloat16 wmma one would fail the whole
    module below sm_80."""
    return tuple(e for e in NAME_EXPRESSIONS if _compiles_on(e, cc))


def _fn(expr, shared=0):
    return function(SOURCE, _device_exprs(_module.current_device()[0]), expr, shared)


def _dmax(d, dv):
    for m in DMAXES:
        if max(d, dv, 1) <= m:
            return m
    return None


def cuda_core_blocks(kernel, d, dv, itemsize, vectors_in_shared, budget=SHARED_BYTES):
    """``(rows per block, rows per staged tile, dynamic shared bytes)`` of a CUDA-core kernel.

    A block has one thread per query row (``sdpa_fwd``, ``sdpa_dq``) or key row
    (``sdpa_dkdv``), a power of two; its shared memory holds the staged tile (K and V rows, or
    Q, dO, lse and D rows), the tile's logits (``sdpa_fwd``) or dS (``sdpa_dq``, pitch rows + 1,
    and a row sum per thread) and, ``vectors_in_shared``, every thread's row vectors. The
    largest block with tiles of 8 rows or more in ``budget`` bytes is taken, else the largest
    with any tile.
    """
    widths = {"sdpa_fwd": d + dv, "sdpa_dq": 2 * d + dv, "sdpa_dkdv": 2 * (d + dv)}[kernel]
    per_thread = ((widths if vectors_in_shared else 0) + (kernel == "sdpa_dq")) * itemsize

    def per_tile_row(rows):
        if kernel == "sdpa_dkdv":
            return (d + dv + 2) * itemsize
        return (d + dv + rows + (kernel == "sdpa_dq")) * itemsize

    fits = []
    for rows in (64, 32, 16, 8, 4, 2, 1):
        tile = min(BLOCK_K, (budget - rows * per_thread) // per_tile_row(rows))
        if tile >= 1:
            fits.append((rows, tile))
    if not fits:
        raise ValueError(f"{kernel}: d={d}, dv={dv} do not fit {budget} bytes of shared memory")
    rows, tile = next((f for f in fits if f[1] >= 8), fits[0])
    return rows, tile, rows * per_thread + tile * per_tile_row(rows)


def _cuda_core(kernel, t, acc, d, dv, itemsize):
    """The instantiation and ``cuda_core_blocks`` of a CUDA-core kernel for this call."""
    dmax = _dmax(d, dv)
    sh = shared_vectors(kernel, acc, dmax)
    budget = max(SHARED_BYTES, _module.current_device()[1]) if sh else SHARED_BYTES
    return _cuda_core_expr(kernel, t, acc, dmax), cuda_core_blocks(
        kernel, d, dv, itemsize, sh, budget
    )


def _wmma_shared(dp, itemsize):
    tp, sp, pp = dp + 8, WMMA_BK + 4, WMMA_BK + 8
    return (
        (WMMA_BQ + 2 * WMMA_BK) * tp * itemsize
        + WMMA_BQ * sp * 4
        + WMMA_BQ * pp * itemsize
        + WMMA_BQ * 4
    )


def _wmma_dkdv_shared(dp, itemsize):
    tp, sp, pp = dp + 8, WMMA_QB + 4, WMMA_QB + 8
    return (
        (2 * WMMA_KEYS + 2 * WMMA_QB) * tp * itemsize
        + 2 * WMMA_KEYS * sp * 4
        + WMMA_KEYS * pp * itemsize
        + 2 * WMMA_QB * 4
    )


def _wmma_dq_shared(dp, itemsize):
    tp, sp, pp = dp + 8, WMMA_BK + 4, WMMA_BK + 8
    return (
        (2 * WMMA_BQ + 2 * WMMA_BK) * tp * itemsize
        + 2 * WMMA_BQ * sp * 4
        + WMMA_BQ * pp * itemsize
        + 3 * WMMA_BQ * 4
    )


def _wmma_dp(name, d, dv, itemsize):
    """The padded head width of the tensor-core kernels for this call, or None (CUDA cores):
    float16/bfloat16, d and dv <= 128, and a device with the tensor cores and the shared memory
    all three kernels need at that width (at most 77 KiB, the backward at 128)."""
    if name not in _HALF:
        return None
    dp = next((p for p in WMMA_DPS if max(d, dv) <= p), None)
    if dp is None:
        return None
    cc, shared = _module.current_device()
    if cc < _WMMA_MIN_CC[_CTYPES[name][0]]:
        return None
    need = max(
        _wmma_shared(dp, itemsize), _wmma_dkdv_shared(dp, itemsize), _wmma_dq_shared(dp, itemsize)
    )
    return dp if need <= shared else None


def _plan(cp, a, batch, rows, cols, dtype):
    """(flat data, per-head offsets, row stride, col stride, data) of a broadcast mask/bias."""
    from .._cuda import broadcast_plan

    return broadcast_plan(cp, a, batch, rows, cols, dtype=dtype)


def _plans(cp, mask, bias, batch, lq, lk, dtype):
    """Mask and bias kernel arguments; the bias in ``dtype``, the accumulation type (a float32
    bias with float16 inputs stays float32, as the reference adds it)."""
    i64 = np.int64
    if mask is not None:
        mflat, moffs, mrs, mcs, _ = _plan(cp, mask, batch, lq, lk, np.bool_)
        mflat = mflat.view(cp.uint8)
    else:
        mflat, moffs, mrs, mcs = cp.zeros(1, cp.uint8), cp.zeros(1, i64), 0, 0
    m = (mflat, moffs, i64(mrs), i64(mcs), np.int32(mask is not None))
    if bias is not None:
        bflat, boffs, brs, bcs, bdata = _plan(cp, bias, batch, lq, lk, dtype)
    else:
        bflat, boffs, brs, bcs, bdata = cp.zeros(1, dtype), cp.zeros(1, i64), 0, 0, None
    b = (bflat, boffs, i64(brs), i64(bcs), np.int32(bias is not None))
    return m, b, bdata


def _names(dtype):
    name = np.dtype(dtype).name
    t, acc = _CTYPES[name]
    return name, t, acc, (np.float64 if acc == "double" else np.float32)


@on_inputs_device
def sdpa_forward(q, k, v, *, mask=None, bias=None, causal=None, scale, gqa_groups=1):
    """``(out, lse)`` like the reference ``sdpa_forward``, on CuPy arrays."""
    import cupy as cp

    name, t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-2])
    nb, nkv = math.prod(batch), math.prod(batch) // gqa_groups
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    out = cp.empty((nb, lq, dv), dtype=q.dtype)
    lse = cp.empty((nb, lq), dtype=adt)
    if nb and lq:
        q3 = cp.ascontiguousarray(q).reshape(nb, lq, d)
        k3 = cp.ascontiguousarray(k).reshape(nkv, lk, d)
        v3 = cp.ascontiguousarray(v).reshape(nkv, lk, dv)
        m, b, _ = _plans(cp, mask, bias, batch, lq, lk, adt)
        coff = np.int64(0 if causal in (None, "top_left") else lk - lq)
        head = (
            q3,
            k3,
            v3,
            np.int32(nb),
            np.int32(lq),
            np.int32(lk),
            np.int32(d),
            np.int32(dv),
            np.int32(gqa_groups),
        )
        tail = (*m, *b, np.int32(causal is not None), coff, out, lse)
        dp = _wmma_dp(name, d, dv, q.dtype.itemsize)
        if dp is not None:
            shared = _wmma_shared(dp, q.dtype.itemsize)
            fn = _fn(f"sdpa_fwd_wmma<{t}, {dp}>", shared)
            fn(
                (nb * -(-lq // WMMA_BQ),),
                (128,),
                (*head, np.float32(scale), *tail),
                shared_mem=shared,
            )
        else:
            expr, (bq, bk, shared) = _cuda_core("sdpa_fwd", t, acc, d, dv, np.dtype(adt).itemsize)
            _fn(expr, shared)(
                (nb * -(-lq // bq),),
                (bq,),
                (*head, np.int32(bk), adt(scale), *tail),
                shared_mem=shared,
            )
    return out.reshape(batch + (lq, dv)), lse.reshape(batch + (lq,))


def _dbias_plan(bdata, batch, lq, lk, block_q, itemsize):
    from .._cuda import dbias_plan

    return dbias_plan(bdata.shape, batch, lq, lk, block_q, itemsize)


def _dbias_reduce(cp, plan, part, chunk, first, dbias, acc, adt):
    """Launch ``sdpa_dbias_reduce`` for the partials of one chunk of query heads."""
    _, _, hptr, hbh = chunk
    per_block = REDUCE_THREADS // plan.lanes
    _fn(f"sdpa_dbias_reduce<{acc}>")(
        (-(-dbias.size // per_block),),
        (REDUCE_THREADS,),
        (
            part,
            np.int64(plan.pr),
            np.int64(plan.pc),
            np.int32(plan.rows),
            np.int32(plan.cols),
            cp.asarray(hptr),
            cp.asarray(hbh),
            np.int64(plan.nrows),
            np.int64(plan.ncols),
            np.int64(dbias.size),
            np.int32(plan.lanes),
            np.int32(not first),
            dbias,
        ),
        shared_mem=REDUCE_THREADS * np.dtype(adt).itemsize,
    )


@on_inputs_device
def sdpa_backward(
    q, k, v, out, lse, dout, dlse=None, *, mask=None, bias=None, causal=None, scale, gqa_groups=1
):
    """``(dq, dk, dv, dbias)`` like the reference ``sdpa_backward``, on CuPy arrays."""
    import cupy as cp

    name, t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-2])
    nb, nkv = math.prod(batch), math.prod(batch) // gqa_groups
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    dq = cp.zeros((nb, lq, d), dtype=q.dtype)
    dk = cp.zeros((nkv, lk, d), dtype=q.dtype)
    dvv = cp.zeros((nkv, lk, dv), dtype=q.dtype)
    m, b, bdata = _plans(cp, mask, bias, batch, lq, lk, adt)
    dbias = cp.zeros(bdata.size, dtype=adt) if bias is not None else None
    if nb and lq and lk:
        isz = np.dtype(adt).itemsize
        q3 = cp.ascontiguousarray(q).reshape(nb, lq, d)
        k3 = cp.ascontiguousarray(k).reshape(nkv, lk, d)
        v3 = cp.ascontiguousarray(v).reshape(nkv, lk, dv)
        do3 = cp.ascontiguousarray(dout.astype(q.dtype, copy=False)).reshape(nb, lq, dv)
        o3 = cp.ascontiguousarray(out.astype(q.dtype, copy=False)).reshape(nb, lq, dv)
        lse2 = cp.ascontiguousarray(lse.astype(adt, copy=False)).reshape(nb, lq)
        has_dlse = dlse is not None
        dl2 = (
            cp.ascontiguousarray(dlse.astype(adt, copy=False)).reshape(nb, lq)
            if has_dlse
            else cp.zeros(1, adt)
        )
        delta = cp.empty((nb, lq), dtype=adt)
        rows = nb * lq
        _fn(f"sdpa_delta<{t}, {acc}>")(
            (-(-rows // 256),),
            (256,),
            (do3, o3, dl2, np.int32(has_dlse), np.int64(rows), np.int32(dv), delta),
        )
        coff = np.int64(0 if causal in (None, "top_left") else lk - lq)
        head = (q3, k3, v3, do3, lse2, delta) + tuple(
            np.int32(x) for x in (nb, lq, lk, d, dv, gqa_groups)
        )
        tail = (*m, *b, np.int32(causal is not None), coff)
        dp = _wmma_dp(name, d, dv, q.dtype.itemsize)
        if dp is not None:
            shared = _wmma_dkdv_shared(dp, q.dtype.itemsize)
            _fn(f"sdpa_dkdv_wmma<{t}, {dp}>", shared)(
                (nkv * -(-lk // WMMA_KEYS),),
                (128,),
                (*head, np.float32(scale), *tail, dk, dvv),
                shared_mem=shared,
            )
            bq, dq_threads, dq_shared = WMMA_BQ, 128, _wmma_dq_shared(dp, q.dtype.itemsize)
            dq_fn = _fn(f"sdpa_dq_wmma<{t}, {dp}>", dq_shared)
            dq_scale = (np.float32(scale),)
        else:
            expr, (bj, bi, shared) = _cuda_core("sdpa_dkdv", t, acc, d, dv, isz)
            _fn(expr, shared)(
                (nkv * -(-lk // bj),),
                (bj,),
                (*head, np.int32(bi), adt(scale), *tail, dk, dvv),
                shared_mem=shared,
            )
            expr, (bq, bk, dq_shared) = _cuda_core("sdpa_dq", t, acc, d, dv, isz)
            dq_threads = bq
            dq_fn = _fn(expr, dq_shared)
            dq_scale = (np.int32(bk), adt(scale))
        nqt = -(-lq // bq)
        plan = None
        if bias is not None and dbias.size:
            plan = _dbias_plan(bdata, batch, lq, lk, bq, isz)
        chunks = plan.chunks if plan is not None else ((0, nb, None, None),)
        part = None
        if plan is not None and not plan.direct:
            most = max(bh1 - bh0 for bh0, bh1, _, _ in chunks)
            part = cp.empty(most * plan.pr * plan.pc, dtype=adt)
        for n, chunk in enumerate(chunks):
            bh0, bh1 = chunk[:2]
            if plan is None:
                db = (dbias if dbias is not None else cp.zeros(1, adt), 0, 0, 0)
            else:
                if part is not None:
                    part.fill(0)  # causally skipped keys contribute zeros
                db = (dbias if plan.direct else part, 1, int(plan.rows), int(plan.cols))
            dq_fn(
                ((bh1 - bh0) * nqt,),
                (dq_threads,),
                (
                    *head,
                    *dq_scale,
                    *tail,
                    np.int32(bh0),
                    db[0],
                    *(np.int32(x) for x in db[1:]),
                    dq,
                ),
                shared_mem=dq_shared,
            )
            if part is not None:
                _dbias_reduce(cp, plan, part, chunk, n == 0, dbias, acc, adt)
    if bias is not None:
        dbias = dbias.reshape(bias.shape).astype(bias.dtype, copy=False)
    return dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape), dbias


@requirement(f"head widths d, dv <= {DMAXES[-1]}")
def _head_widths(call):
    q, v = call.arrays["q"], call.arrays["v"]
    if _dmax(q.shape[-1], v.shape[-1]) is None:
        return f"head widths up to {DMAXES[-1]}, got d={q.shape[-1]}, dv={v.shape[-1]}"
    return None


# The kernel runs in the SDPA convention of arrayattn._glue.attention (the op adapts it).
KERNELS = {
    "scaled_dot_product_attention": Kernel(
        sdpa_forward,
        sdpa_backward,
        dtypes=tuple(_CTYPES),
        requires=(_head_widths,),
    )
}

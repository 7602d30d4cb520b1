"""CuPy launchers of ``attention.cu``: scaled dot-product attention forward and backward.

float32/float64 run the CUDA-core kernels (float64 accumulates in float64); float16 (and bfloat16
where the array library has it) with head widths up to 128 run forward and backward on tensor
cores (``sdpa_fwd_wmma``, ``sdpa_dkdv_wmma``, ``sdpa_dq_wmma``: float32 accumulation; ``P`` and
``dS`` rounded to the input dtype for the products, as FlashAttention-2 does), wider heads on
CUDA cores with float32 accumulation. The bias gradient always runs on CUDA cores. The module is
compiled on first use (``cupy.RawModule`` with ``name_expressions``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from arrayattn.attention import sdpa_kernel

from ._module import function, on_inputs_device

__all__ = ["KERNELS", "NAME_EXPRESSIONS", "SOURCE", "sdpa_backward", "sdpa_forward"]

SOURCE = "attention.cu"
#: Register-array widths the CUDA-core kernels are instantiated for (d and dv <= DMAX).
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
BLOCK_Q = 64  # query (or key) rows per block of the CUDA-core kernels
BLOCK_K = 32  # most rows of a staged tile
SHARED_BYTES = 40 * 1024
WMMA_BQ, WMMA_BK = 64, 32
WMMA_KEYS, WMMA_QB = 64, 32  # key rows per block and staged query rows of sdpa_dkdv_wmma


def _exprs() -> tuple[str, ...]:
    out = []
    for t, acc in _CTYPES.values():
        out += [f"sdpa_delta<{t}, {acc}>", f"sdpa_dbias<{t}, {acc}>"]
        for dmax in DMAXES:
            out += [
                f"sdpa_fwd<{t}, {acc}, {dmax}>",
                f"sdpa_dkdv<{t}, {acc}, {dmax}>",
                f"sdpa_dq<{t}, {acc}, {dmax}>",
            ]
    for name in _HALF:
        t = _CTYPES[name][0]
        for kernel in ("sdpa_fwd_wmma", "sdpa_dkdv_wmma", "sdpa_dq_wmma"):
            out += [f"{kernel}<{t}, {dp}>" for dp in WMMA_DPS]
    return tuple(out)


NAME_EXPRESSIONS = _exprs()


@functools.cache
def _device(device_id):
    """(compute capability as an int, e.g. 90; opt-in shared memory per block in bytes)."""
    import cupy as cp

    dev = cp.cuda.Device(device_id)
    return int(dev.compute_capability), dev.attributes["MaxSharedMemoryPerBlockOptin"]


def _current_device():
    """(compute capability, shared memory) of the current device: the inputs' device, as every
    launcher runs under :func:`._module.on_inputs_device`."""
    import cupy as cp

    return _device(cp.cuda.Device().id)


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
    return function(SOURCE, _device_exprs(_current_device()[0]), expr, shared)


def _dmax(d, dv):
    for m in DMAXES:
        if max(d, dv, 1) <= m:
            return m
    return None


def _tile(d, dv, itemsize):
    return max(1, min(BLOCK_K, SHARED_BYTES // (max(1, d + dv) * itemsize)))


def _wmma_shared(dp, itemsize):
    return (
        (WMMA_BQ + 2 * WMMA_BK) * dp * itemsize
        + WMMA_BQ * WMMA_BK * (4 + itemsize)
        + WMMA_BQ * dp * 4
        + 3 * WMMA_BQ * 4
    )


def _wmma_dkdv_shared(dp, itemsize):
    return (
        (2 * WMMA_KEYS + 2 * WMMA_QB) * dp * itemsize
        + WMMA_KEYS * WMMA_QB * (8 + itemsize)
        + 2 * WMMA_KEYS * dp * 4
        + 2 * WMMA_QB * 4
    )


def _wmma_dq_shared(dp, itemsize):
    return (
        (2 * WMMA_BQ + 2 * WMMA_BK) * dp * itemsize
        + WMMA_BQ * WMMA_BK * (8 + itemsize)
        + WMMA_BQ * dp * 4
        + 2 * WMMA_BQ * 4
    )


def _wmma_dp(name, d, dv, itemsize):
    """The padded head width of the tensor-core kernels for this call, or None (CUDA cores):
    float16/bfloat16, d and dv <= 128, and a device with the tensor cores and the shared memory
    all three kernels need at that width (e.g. 132 KiB for the backward at 128 on sm_80/sm_90;
    an sm_86 card, 99 KiB, takes widths up to 64 there)."""
    if name not in _HALF:
        return None
    dp = next((p for p in WMMA_DPS if max(d, dv) <= p), None)
    if dp is None:
        return None
    cc, shared = _current_device()
    if cc < _WMMA_MIN_CC[_CTYPES[name][0]]:
        return None
    need = max(
        _wmma_shared(dp, itemsize), _wmma_dkdv_shared(dp, itemsize), _wmma_dq_shared(dp, itemsize)
    )
    return dp if need <= shared else None


def _plan(cp, a, batch, rows, cols, dtype):
    """(flat data, per-head offsets, row stride, col stride, data) of a broadcast mask/bias."""
    from arrayattn.backends.numba_cuda._common import broadcast_plan

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
            bk = _tile(d, dv, np.dtype(adt).itemsize)
            shared = bk * (d + dv) * np.dtype(adt).itemsize
            fn = _fn(f"sdpa_fwd<{t}, {acc}, {_dmax(d, dv)}>")
            fn(
                (nb * -(-lq // BLOCK_Q),),
                (BLOCK_Q,),
                (*head, np.int32(bk), adt(scale), *tail),
                shared_mem=shared,
            )
    return out.reshape(batch + (lq, dv)), lse.reshape(batch + (lq,))


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
        isz = np.dtype(adt).itemsize
        bt = _tile(d, dv, isz)
        dmax = _dmax(d, dv)
        head = (
            q3,
            k3,
            v3,
            do3,
            lse2,
            delta,
            np.int32(nb),
            np.int32(lq),
            np.int32(lk),
            np.int32(d),
            np.int32(dv),
            np.int32(gqa_groups),
            np.int32(bt),
            adt(scale),
        )
        tail = (*m, *b, np.int32(causal is not None), coff)
        dp = _wmma_dp(name, d, dv, q.dtype.itemsize)
        if dp is not None:
            wmma_head = (*head[:12], np.float32(scale))
            shared = _wmma_dkdv_shared(dp, q.dtype.itemsize)
            _fn(f"sdpa_dkdv_wmma<{t}, {dp}>", shared)(
                (nkv * -(-lk // WMMA_KEYS),),
                (128,),
                (*wmma_head, *tail, dk, dvv),
                shared_mem=shared,
            )
            shared = _wmma_dq_shared(dp, q.dtype.itemsize)
            _fn(f"sdpa_dq_wmma<{t}, {dp}>", shared)(
                (nb * -(-lq // WMMA_BQ),), (128,), (*wmma_head, *tail, dq), shared_mem=shared
            )
        else:
            _fn(f"sdpa_dkdv<{t}, {acc}, {dmax}>")(
                (nkv * -(-lk // BLOCK_Q),),
                (BLOCK_Q,),
                (*head, *tail, dk, dvv),
                shared_mem=bt * (d + dv + 2) * isz,
            )
            _fn(f"sdpa_dq<{t}, {acc}, {dmax}>")(
                (nb * -(-lq // BLOCK_Q),),
                (BLOCK_Q,),
                (*head, *tail, dq),
                shared_mem=bt * (d + dv) * isz,
            )
        if bias is not None and dbias.size:
            nrows = bdata.shape[-2] if bdata.ndim >= 2 and b[2] else 1
            ncols = bdata.shape[-1] if b[3] else 1
            size = dbias.size
            _fn(f"sdpa_dbias<{t}, {acc}>")(
                (-(-size // 128),),
                (128,),
                (
                    *head[:12],
                    adt(scale),
                    *m,
                    *b[:4],
                    np.int32(causal is not None),
                    coff,
                    np.int64(size),
                    np.int64(nrows),
                    np.int64(ncols),
                    dbias,
                ),
            )
    if bias is not None:
        dbias = dbias.reshape(bias.shape).astype(bias.dtype, copy=False)
    return dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape), dbias


def _supports(call):
    q, v = call.arrays["q"], call.arrays["v"]
    name = np.dtype(q.dtype).name
    if name not in _CTYPES:
        return f"takes float16, bfloat16, float32 or float64 inputs, got {q.dtype}"
    if _dmax(q.shape[-1], v.shape[-1]) is None:
        return f"head widths up to {DMAXES[-1]}, got d={q.shape[-1]}, dv={v.shape[-1]}"
    return None


KERNELS = {"scaled_dot_product_attention": sdpa_kernel(sdpa_forward, sdpa_backward, _supports)}

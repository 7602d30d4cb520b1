"""CuPy launchers of ``neighborhood.cu``: windowed local attention forward and backward (fused).

One kernel set serves :func:`~arrayattn.neighborhood_attention_2d`,
:func:`~arrayattn.neighborhood_attention_1d` and :func:`~arrayattn.halo_attention` (the separable
window tables of :mod:`arrayattn._reference.neighborhood`, as the CPU and Numba-CUDA kernels).
float32 and float64 run on CUDA cores in their own precision; float16 (and bfloat16 where the array
library has it) are stored in half precision and accumulated in float32 (the logsumexp and the
table gradients are float32, then cast to the table dtype). Keys are read in place through the
window tables, never unfolded; every gradient has a single writer (no atomics).
"""

from __future__ import annotations

import math

import numpy as np

from arrayattn._kernel import Kernel, requirement

from ._module import function, in_shared, on_inputs_device, pixel_launch

__all__ = [
    "KERNELS",
    "NAME_EXPRESSIONS",
    "SOURCE",
    "window_attention_backward",
    "window_attention_forward",
]

SOURCE = "neighborhood.cu"
#: Register-array widths the kernels are instantiated for (d and dv <= DMAX).
DMAXES = (32, 64, 128, 256)
_CTYPES = {
    "float32": ("float", "float"),
    "float64": ("double", "double"),
    "float16": ("__half", "float"),
    "bfloat16": ("__nv_bfloat16", "float"),
}
THREADS = 128


#: Row vectors per thread, as counted against ``REG_WORDS``: the output accumulator; dq (counted
#: twice: with its other live state, 128 registers of dq spilled on sm_80); dk and dv.
_VECTORS = {"na_fwd": 1, "na_dq": 2, "na_dkdv": 2}


def _expr(kernel, t, acc, dmax):
    return f"{kernel}<{t}, {acc}, {dmax}, {str(in_shared(_VECTORS[kernel], acc, dmax)).lower()}>"


def _exprs() -> tuple[str, ...]:
    out = ["na_dbias<float>", "na_dbias<double>"]
    for t, acc in _CTYPES.values():
        out.append(f"na_dtable<{t}, {acc}>")
        for dm in DMAXES:
            out += [_expr(kernel, t, acc, dm) for kernel in _VECTORS]
    return tuple(out)


NAME_EXPRESSIONS = _exprs()


def _fn(expr, shared=0):
    return function(SOURCE, NAME_EXPRESSIONS, expr, shared)


def _launch(kernel, t, acc, npix, widths, itemsize, args):
    """Launch a one-thread-per-pixel kernel; ``widths``: the sizes of its row vectors."""
    dmax = _dmax(max(widths))
    sh = in_shared(_VECTORS[kernel], acc, dmax)
    grid, block, shared = pixel_launch(npix, sum(widths) * itemsize if sh else 0, THREADS)
    _fn(_expr(kernel, t, acc, dmax), shared)(grid, block, args, shared_mem=shared)


def _dmax(n):
    return next((m for m in DMAXES if max(n, 1) <= m), None)


def _names(dtype):
    t, acc = _CTYPES[np.dtype(dtype).name]
    return t, acc, (np.float64 if acc == "double" else np.float32)


def _tables(cp, win):
    from .._cuda import device_tables

    return device_tables(cp, win)


def _plan(cp, a, batch, rows, cols, dtype):
    """Kernel arguments (flat, offsets, row stride, col stride, flag) and the data of a table."""
    i64 = np.int64
    if a is None:
        return (cp.zeros(1, dtype), cp.zeros(1, i64), i64(0), i64(0), np.int32(0)), None
    from .._cuda import broadcast_plan

    flat, offs, rs, cs, data = broadcast_plan(cp, a, batch, rows, cols, dtype=dtype)
    return (flat, offs, i64(rs), i64(cs), np.int32(1)), data


def _plans(cp, wy, wx, batch, d, dtype, rel_bias, r_h, r_w):
    """The relative bias and tables in ``dtype``, the accumulation type: a float32 table with
    float16 maps is read as given, as the reference reads it."""
    return (
        _plan(cp, rel_bias, batch, wy.table, wx.table, dtype),
        _plan(cp, r_h, batch, wy.table, d, dtype),
        _plan(cp, r_w, batch, wx.table, d, dtype),
    )


def _c4(cp, x, nb, dtype):
    return cp.ascontiguousarray(x.astype(dtype, copy=False)).reshape((nb,) + tuple(x.shape[-3:]))


@on_inputs_device
def window_attention_forward(
    q, k, v, wy, wx, *, boundary, scale, rel_bias=None, r_h=None, r_w=None, block=None
):
    """``(out, lse)`` like the reference ``window_attention_forward``, on CuPy arrays."""
    import cupy as cp

    t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    out = cp.empty((nb, h, w, dv), dtype=q.dtype)
    lse = cp.empty((nb, h, w), dtype=adt)
    npix = nb * h * w
    if npix:
        ytab, xtab = _tables(cp, wy)[0], _tables(cp, wx)[0]
        pb, ph, pw = _plans(cp, wy, wx, batch, d, adt, rel_bias, r_h, r_w)
        _launch(
            "na_fwd",
            t,
            acc,
            npix,
            (dv,),
            np.dtype(adt).itemsize,
            (
                _c4(cp, q, nb, q.dtype),
                _c4(cp, k, nb, q.dtype),
                _c4(cp, v, nb, q.dtype),
                np.int32(nb),
                np.int32(h),
                np.int32(w),
                np.int32(d),
                np.int32(dv),
                ytab,
                np.int32(ytab.shape[1]),
                xtab,
                np.int32(xtab.shape[1]),
                np.int32(boundary == "zero"),
                adt(scale),
                *pb[0],
                *ph[0],
                *pw[0],
                out,
                lse,
            ),
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
    import cupy as cp

    t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    ky, kx = wy.idx.shape[0], wx.idx.shape[0]
    dq = cp.zeros((nb, h, w, d), dtype=q.dtype)
    dk = cp.zeros((nb, h, w, d), dtype=q.dtype)
    dvv = cp.zeros((nb, h, w, dv), dtype=q.dtype)
    pb, ph, pw = _plans(cp, wy, wx, batch, d, adt, rel_bias, r_h, r_w)
    grads = [None if p[1] is None else cp.zeros(p[1].size, dtype=adt) for p in (pb, ph, pw)]
    npix = nb * h * w
    if npix:
        ytab, yptr, yinv, yrptr, yrel = _tables(cp, wy)
        xtab, xptr, xinv, xrptr, xrel = _tables(cp, wx)
        q4, k4, v4 = _c4(cp, q, nb, q.dtype), _c4(cp, k, nb, q.dtype), _c4(cp, v, nb, q.dtype)
        o4, do4 = _c4(cp, out, nb, q.dtype), _c4(cp, dout, nb, q.dtype)
        lse3 = cp.ascontiguousarray(lse.astype(adt, copy=False)).reshape(nb, h, w)
        delta = cp.empty((nb, h, w), dtype=adt)
        has_bias, has_rh, has_rw = (p[1] is not None for p in (pb, ph, pw))
        dlst = cp.empty((nb, h, w, ky * kx) if has_bias else 1, dtype=adt)
        suma = cp.empty((nb, h, w, ky) if has_rh else 1, dtype=adt)
        sumc = cp.empty((nb, h, w, kx) if has_rw else 1, dtype=adt)
        dims = (np.int32(nb), np.int32(h), np.int32(w), np.int32(d), np.int32(dv))
        win = (ytab, np.int32(ky), xtab, np.int32(kx))
        plans = (*pb[0], *ph[0], *pw[0])
        isz = np.dtype(adt).itemsize
        _launch(
            "na_dq",
            t,
            acc,
            npix,
            (d,),
            isz,
            (
                q4,
                k4,
                v4,
                o4,
                do4,
                lse3,
                *dims,
                *win,
                np.int32(boundary == "zero"),
                adt(scale),
                *plans,
                dq,
                delta,
                dlst,
                suma,
                sumc,
            ),
        )
        _launch(
            "na_dkdv",
            t,
            acc,
            npix,
            (d, dv),
            isz,
            (
                q4,
                k4,
                v4,
                do4,
                lse3,
                delta,
                *dims,
                *win,
                yptr,
                yinv,
                np.int32(yinv.shape[1]),
                xptr,
                xinv,
                np.int32(xinv.shape[1]),
                adt(scale),
                *plans,
                dk,
                dvv,
            ),
        )
        size = grads[0].size if has_bias else 0
        if size:
            _fn(f"na_dbias<{acc}>")(
                (-(-size // THREADS),),
                (THREADS,),
                (
                    dlst,
                    np.int32(nb),
                    np.int32(h),
                    np.int32(w),
                    np.int32(ky),
                    np.int32(kx),
                    yrptr,
                    yrel,
                    np.int32(yrel.shape[1]),
                    xrptr,
                    xrel,
                    np.int32(xrel.shape[1]),
                    pb[0][1],
                    np.int64(wy.table),
                    np.int64(wx.table),
                    np.int64(size),
                    grads[0],
                ),
            )
        for axis, p, sums, rptr, rel, rows, kslots, g in (
            (0, ph, suma, yrptr, yrel, wy.table, ky, grads[1]),
            (1, pw, sumc, xrptr, xrel, wx.table, kx, grads[2]),
        ):
            if g is not None and g.size:
                _fn(f"na_dtable<{t}, {acc}>")(
                    (-(-g.size // THREADS),),
                    (THREADS,),
                    (
                        q4,
                        sums,
                        *dims[:4],
                        np.int32(kslots),
                        np.int32(axis),
                        rptr,
                        rel,
                        np.int32(rel.shape[1]),
                        p[0][1],
                        np.int64(rows),
                        np.int64(d),
                        np.int64(g.size),
                        g,
                    ),
                )
    like = (rel_bias, r_h, r_w)
    grads = [
        None if g is None else g.reshape(a.shape).astype(a.dtype, copy=False)
        for g, a in zip(grads, like, strict=True)
    ]
    return (dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape), *grads)


# -- Kernel ---------------------------------------------------------------------------------------


@requirement(f"channel widths d, dv <= {DMAXES[-1]}")
def _widths(call):
    q, v = call.arrays["q"], call.arrays["v"]
    if _dmax(max(q.shape[-1], v.shape[-1])) is None:
        return f"channel widths up to {DMAXES[-1]}, got d={q.shape[-1]}, dv={v.shape[-1]}"
    return None


# The kernels run in the window convention of arrayattn._glue.neighborhood (the op adapts them).
_KERNEL = Kernel(
    window_attention_forward,
    window_attention_backward,
    dtypes=tuple(_CTYPES),
    requires=(_widths,),
)

KERNELS = {
    "neighborhood_attention_2d": _KERNEL,
    "neighborhood_attention_1d": _KERNEL,
    "halo_attention": _KERNEL,
}

"""CuPy launchers of ``criss_cross.cu``: criss-cross attention forward and backward (fused).

All four dtypes run on CUDA cores (float16/bfloat16 stored, float32 accumulated; float64 in
float64). One thread per pixel; the H + W - 1 keys of a pixel are read in place, never unfolded.
"""

from __future__ import annotations

import math

import numpy as np

from arrayattn._kernel import Kernel, requirement

from ._module import function, in_shared, on_inputs_device, pixel_launch

__all__ = ["KERNELS", "NAME_EXPRESSIONS", "SOURCE", "criss_cross_backward", "criss_cross_forward"]

SOURCE = "criss_cross.cu"
DMAXES = (32, 64, 128, 256, 512)
_CTYPES = {
    "float32": ("float", "float"),
    "float64": ("double", "double"),
    "float16": ("__half", "float"),
    "bfloat16": ("__nv_bfloat16", "float"),
}
THREADS = 128


#: Row vectors per thread: the output accumulator; dq; dk and dv.
_VECTORS = {"cc_fwd": 1, "cc_dq": 1, "cc_dkdv": 2}


def _expr(kernel, t, acc, dmax):
    return f"{kernel}<{t}, {acc}, {dmax}, {str(in_shared(_VECTORS[kernel], acc, dmax)).lower()}>"


def _exprs():
    out = []
    for t, acc in _CTYPES.values():
        out.append(f"cc_delta<{t}, {acc}>")
        for dm in DMAXES:
            out += [_expr(kernel, t, acc, dm) for kernel in _VECTORS]
    return tuple(out)


def _launch(kernel, t, acc, npix, widths, itemsize, args):
    """Launch a one-thread-per-pixel kernel; ``widths``: the sizes of its row vectors."""
    dmax = _dmax(max(widths))
    sh = in_shared(_VECTORS[kernel], acc, dmax)
    grid, block, shared = pixel_launch(npix, sum(widths) * itemsize if sh else 0, THREADS)
    function(SOURCE, NAME_EXPRESSIONS, _expr(kernel, t, acc, dmax), shared)(
        grid, block, args, shared_mem=shared
    )


NAME_EXPRESSIONS = _exprs()


def _dmax(n):
    return next((m for m in DMAXES if max(n, 1) <= m), None)


def _names(dtype):
    t, acc = _CTYPES[np.dtype(dtype).name]
    return t, acc, (np.float64 if acc == "double" else np.float32)


@on_inputs_device
def criss_cross_forward(q, k, v, *, scale):
    import cupy as cp

    t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    out = cp.empty((nb, h, w, dv), dtype=q.dtype)
    lse = cp.empty((nb, h, w), dtype=adt)
    npix = nb * h * w
    if npix:
        args = [cp.ascontiguousarray(a) for a in (q, k, v)]
        dims = tuple(np.int32(x) for x in (nb, h, w, d, dv))
        isz = np.dtype(adt).itemsize
        _launch("cc_fwd", t, acc, npix, (dv,), isz, (*args, *dims, adt(scale), out, lse))
    return out.reshape(batch + (h, w, dv)), lse.reshape(batch + (h, w))


@on_inputs_device
def criss_cross_backward(q, k, v, out, lse, dout, *, scale):
    import cupy as cp

    t, acc, adt = _names(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    dq, dk = cp.zeros(q.shape, q.dtype), cp.zeros(k.shape, k.dtype)
    dvv = cp.zeros(v.shape, v.dtype)
    npix = nb * h * w
    if npix:
        q_, k_, v_ = (cp.ascontiguousarray(a) for a in (q, k, v))
        do = cp.ascontiguousarray(dout.astype(q.dtype, copy=False))
        o = cp.ascontiguousarray(out.astype(q.dtype, copy=False))
        lse_ = cp.ascontiguousarray(lse.astype(adt, copy=False))
        delta = cp.empty((nb, h, w), dtype=adt)
        function(SOURCE, NAME_EXPRESSIONS, f"cc_delta<{t}, {acc}>")(
            (-(-npix // THREADS),), (THREADS,), (do, o, np.int64(npix), np.int32(dv), delta)
        )
        dims = (np.int32(nb), np.int32(h), np.int32(w), np.int32(d), np.int32(dv), adt(scale))
        isz = np.dtype(adt).itemsize
        common = (q_, k_, v_, do, lse_, delta, *dims)
        _launch("cc_dq", t, acc, npix, (d,), isz, (*common, dq))
        _launch("cc_dkdv", t, acc, npix, (d, dv), isz, (*common, dk, dvv))
    return dq, dk, dvv


@requirement(f"channel widths dk, dv <= {DMAXES[-1]}")
def _widths(call):
    q, v = call.arrays["q"], call.arrays["v"]
    if _dmax(max(q.shape[-1], v.shape[-1])) is None:
        return f"channel widths up to {DMAXES[-1]}, got dk={q.shape[-1]}, dv={v.shape[-1]}"
    return None


# The kernel runs in the criss-cross convention of arrayattn._glue.criss_cross (the op adapts it).
KERNELS = {
    "criss_cross_attention": Kernel(
        criss_cross_forward, criss_cross_backward, dtypes=tuple(_CTYPES), requires=(_widths,)
    )
}

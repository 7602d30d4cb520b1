"""Numba-CUDA kernels of criss-cross attention (CCNet), fused: no unfolded copies.

Pixel ``u = (y, x)`` attends to the ``W`` keys of its row and the ``H - 1`` other keys of its
column (one joint softmax). Maps are viewed as (B, H, W, c) with B the flattened batch.

* forward: one thread per query pixel; a pass for the row/column maximum, a pass for
  ``p = exp(s - m)``, the sum and the output; saves ``lse = m + log l``;
* ``D = dO · O`` (one thread per pixel);
* dQ: one thread per query pixel, gathering over its H + W - 1 keys;
* dK/dV: one thread per *key* pixel ``n = (y', x')``, gathering over the queries that see it (its
  row ``(y', x)`` for every x, and its column ``(y, x')`` for y != y') — deterministic, no atomics.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from arrayattn._kernel import Kernel

from ._common import as_lib, caller_stream, launch, lib_of, nblocks, numba_dtype, on_inputs_device

__all__ = ["KERNELS", "criss_cross_backward", "criss_cross_forward"]

THREADS = 64


def _kernels(dtype, d, dv):
    """The compiled kernels for these sizes (compiled once per process, then reused)."""
    return _build(np.dtype(dtype), d, dv)


@functools.cache
def _build(npdtype, d, dv):
    nbt = numba_dtype(npdtype)
    cast = npdtype.type
    zero = cast(0.0)
    ninf = cast(-np.inf)
    dd, ddv = max(d, 1), max(dv, 1)

    @cuda.jit
    def fwd(q, k, v, scale, out, lse):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        y = (t // w) % h
        x = t % w
        qu = cuda.local.array(dd, nbt)
        acc = cuda.local.array(ddv, nbt)
        for c in range(d):
            qu[c] = q[b, y, x, c]
        for c in range(dv):
            acc[c] = zero
        m = ninf
        for n in range(w + h):  # n < w: key (y, n); n >= w: key (n - w, x), skipping y
            yy, xx = (y, n) if n < w else (n - w, x)
            if n >= w and yy == y:
                continue
            s = zero
            for c in range(d):
                s += qu[c] * k[b, yy, xx, c]
            s *= scale
            if s > m:
                m = s
        ell = zero
        for n in range(w + h):
            yy, xx = (y, n) if n < w else (n - w, x)
            if n >= w and yy == y:
                continue
            s = zero
            for c in range(d):
                s += qu[c] * k[b, yy, xx, c]
            p = math.exp(s * scale - m)
            ell += p
            for c in range(dv):
                acc[c] += p * v[b, yy, xx, c]
        for c in range(dv):
            out[b, y, x, c] = acc[c] / ell
        lse[b, y, x] = m + math.log(ell)

    @cuda.jit
    def delta_kernel(do, o, delta):
        nb, h, w = do.shape[0], do.shape[1], do.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        y = (t // w) % h
        x = t % w
        acc = zero
        for c in range(do.shape[3]):
            acc += do[b, y, x, c] * o[b, y, x, c]
        delta[b, y, x] = acc

    @cuda.jit
    def dq_kernel(q, k, v, do, lse, delta, scale, dq):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        y = (t // w) % h
        x = t % w
        dqu = cuda.local.array(dd, nbt)
        for c in range(d):
            dqu[c] = zero
        lu = lse[b, y, x]
        du = delta[b, y, x]
        for n in range(w + h):
            yy, xx = (y, n) if n < w else (n - w, x)
            if n >= w and yy == y:
                continue
            s = zero
            for c in range(d):
                s += q[b, y, x, c] * k[b, yy, xx, c]
            p = math.exp(s * scale - lu)
            dp = zero
            for c in range(dv):
                dp += do[b, y, x, c] * v[b, yy, xx, c]
            ds = p * (dp - du)
            for c in range(d):
                dqu[c] += ds * k[b, yy, xx, c]
        for c in range(d):
            dq[b, y, x, c] = dqu[c] * scale

    @cuda.jit
    def dkdv_kernel(q, k, v, do, lse, delta, scale, dk, dvv):
        nb, h, w = q.shape[0], q.shape[1], q.shape[2]
        t = cuda.grid(1)
        if t >= nb * h * w:
            return
        b = t // (h * w)
        y = (t // w) % h  # the key pixel n = (y, x)
        x = t % w
        dkn = cuda.local.array(dd, nbt)
        dvn = cuda.local.array(ddv, nbt)
        for c in range(d):
            dkn[c] = zero
        for c in range(dv):
            dvn[c] = zero
        for n in range(w + h):  # n < w: query (y, n) (row part); n >= w: query (n - w, x), not y
            yy, xx = (y, n) if n < w else (n - w, x)
            if n >= w and yy == y:
                continue
            s = zero
            for c in range(d):
                s += q[b, yy, xx, c] * k[b, y, x, c]
            p = math.exp(s * scale - lse[b, yy, xx])
            dp = zero
            for c in range(dv):
                dvn[c] += p * do[b, yy, xx, c]
                dp += do[b, yy, xx, c] * v[b, y, x, c]
            ds = p * (dp - delta[b, yy, xx])
            for c in range(d):
                dkn[c] += ds * q[b, yy, xx, c]
        for c in range(d):
            dk[b, y, x, c] = dkn[c] * scale
        for c in range(dv):
            dvv[b, y, x, c] = dvn[c]

    return {"fwd": fwd, "delta": delta_kernel, "dq": dq_kernel, "dkdv": dkdv_kernel}


def _as4(lib, x, nb):
    return lib.ascontiguousarray(x).reshape((nb,) + tuple(x.shape[-3:]))


@on_inputs_device
def criss_cross_forward(q, k, v, *, scale):
    """``(out, lse)`` like the reference ``criss_cross_forward`` (float32/float64)."""
    q, k, v = (as_lib(a) for a in (q, k, v))
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    out = lib.empty((nb, h, w, dv), dtype=dtype)
    lse = lib.empty((nb, h, w), dtype=dtype)
    npix = nb * h * w
    if npix:
        kern = _kernels(dtype, d, dv)["fwd"]
        launch(
            kern,
            nblocks(npix, THREADS),
            THREADS,
            caller_stream(lib),
            _as4(lib, q, nb),
            _as4(lib, k, nb),
            _as4(lib, v, nb),
            dtype.type(scale),
            out,
            lse,
        )
    return out.reshape(batch + (h, w, dv)), lse.reshape(batch + (h, w))


@on_inputs_device
def criss_cross_backward(q, k, v, out, lse, dout, *, scale):
    """``(dq, dk, dv)`` like the reference ``criss_cross_backward``."""
    q, k, v, out, lse, dout = (as_lib(a) for a in (q, k, v, out, lse, dout))
    lib = lib_of(q)
    dtype = np.dtype(q.dtype)
    batch = tuple(q.shape[:-3])
    nb = math.prod(batch)
    h, w, d, dv = q.shape[-3], q.shape[-2], q.shape[-1], v.shape[-1]
    dq = lib.zeros((nb, h, w, d), dtype=dtype)
    dk = lib.zeros((nb, h, w, d), dtype=dtype)
    dvv = lib.zeros((nb, h, w, dv), dtype=dtype)
    npix = nb * h * w
    if npix:
        kerns = _kernels(dtype, d, dv)
        q4, k4, v4 = _as4(lib, q, nb), _as4(lib, k, nb), _as4(lib, v, nb)
        do4 = _as4(lib, dout.astype(dtype, copy=False), nb)
        o4 = _as4(lib, out.astype(dtype, copy=False), nb)
        lse3 = lib.ascontiguousarray(lse.astype(dtype, copy=False)).reshape(nb, h, w)
        delta = lib.empty((nb, h, w), dtype=dtype)
        grid = (nblocks(npix, THREADS), THREADS, caller_stream(lib))
        launch(kerns["delta"], *grid, do4, o4, delta)
        launch(kerns["dq"], *grid, q4, k4, v4, do4, lse3, delta, dtype.type(scale), dq)
        launch(kerns["dkdv"], *grid, q4, k4, v4, do4, lse3, delta, dtype.type(scale), dk, dvv)
    return dq.reshape(q.shape), dk.reshape(k.shape), dvv.reshape(v.shape)


# The kernel runs in the criss-cross convention of arrayattn._glue.criss_cross (the op adapts it);
# float16/bfloat16 are the cupy backend's.
KERNELS = {"criss_cross_attention": Kernel(criss_cross_forward, criss_cross_backward)}

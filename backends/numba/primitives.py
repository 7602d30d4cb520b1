"""Numba kernel of ``conv2d``: im2col into a per-work-item buffer, products by BLAS.

Forward: work items are (image, group, tile of output rows); each fills a (Cg·kh·kw, rows·Wo)
column buffer of its tile (zero padding, stride and dilation resolved while copying) and writes
``W_g · cols`` straight into its rows of ``y`` with one ``sgemm``/``dgemm`` (the CBLAS of NumPy's
OpenBLAS, through the helpers of :mod:`.attention`, single-threaded while the kernel runs). The
unfolded (C·kh·kw, N·Ho·Wo) matrix of the reference never exists: a tile's buffer stays in cache.

Backward: work items are (chunk of images, group); each owns ``dx`` of its images' channels of the
group (col2im scatter-add of ``W_gᵀ · dY`` tile by tile, serial inside the item, so no races) and a
``dweight`` buffer of its chunk (``dY · colsᵀ`` accumulated by BLAS with beta = 1); the chunks'
buffers are added in a fixed order afterwards. The chunk count depends on the shapes only, so
results never depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel

from ._blas import BLAS, gemm, single_threaded_blas

__all__ = ["KERNELS", "conv2d_backward", "conv2d_forward"]

#: Target size of a work item's column buffer, in elements (rows of the output per tile are
#: chosen so that Cg·kh·kw·rows·Wo stays near it: L2-sized).
TILE_ELEMENTS = 1 << 18
MIN_TILE_PIXELS = 256
#: Backward work items: the batch is split into at most this many chunks per group.
MAX_BWD_CHUNKS = 4
#: Calls with fewer multiply-adds than this run the serial twins (no thread pool).
PARALLEL_MIN_WORK = 1 << 24


@njit(inline="always", cache=True)
def _qrange(off, sw, w, wo):
    """Output columns q with 0 <= q·sw + off < w, as [qlo, qhi)."""
    qlo = 0 if off >= 0 else (-off + sw - 1) // sw
    qhi = (w - 1 - off) // sw + 1 if w - 1 - off >= 0 else 0
    qhi = min(qhi, wo)
    return qlo, max(qhi, qlo)


@njit(inline="always", cache=True)
def _fill_cols(x, n, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, wo, cols):
    """cols[(c·kh + i)·kw + j, (p - r0)·Wo + q] = x_pad[n, c0 + c, p·sh + i·dh, q·sw + j·dw]."""
    h, w = x.shape[2], x.shape[3]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = cols[(c * kh + i) * kw + j]
                off = j * dw - pw
                qlo, qhi = _qrange(off, sw, w, wo)
                for p in range(r0, r1):
                    base = (p - r0) * wo
                    hi = p * sh + i * dh - ph
                    if hi < 0 or hi >= h:
                        for q in range(wo):
                            row[base + q] = 0
                        continue
                    xr = x[n, c0 + c, hi]
                    for q in range(qlo):
                        row[base + q] = 0
                    if sw == 1:  # contiguous: a vectorized copy
                        for q in range(qlo, qhi):
                            row[base + q] = xr[q + off]
                    else:
                        for q in range(qlo, qhi):
                            row[base + q] = xr[q * sw + off]
                    for q in range(qhi, wo):
                        row[base + q] = 0


@njit(inline="always", cache=True)
def _add_cols(dcols, n, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, wo, dx):
    """The adjoint of :func:`_fill_cols`: scatter-add a tile's column gradients into dx."""
    h, w = dx.shape[2], dx.shape[3]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = dcols[(c * kh + i) * kw + j]
                off = j * dw - pw
                qlo, qhi = _qrange(off, sw, w, wo)
                for p in range(r0, r1):
                    hi = p * sh + i * dh - ph
                    if hi < 0 or hi >= h:
                        continue
                    base = (p - r0) * wo
                    dxr = dx[n, c0 + c, hi]
                    if sw == 1:
                        for q in range(qlo, qhi):
                            dxr[q + off] += row[base + q]
                    else:
                        for q in range(qlo, qhi):
                            dxr[q * sw + off] += row[base + q]


@njit(inline="always", cache=True)
def _fwd_item(x, wm, bias, has_bias, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, y, item):
    c = x.shape[1]
    o, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    cg, og = c // groups, o // groups
    ck = cg * kh * kw
    ntiles = (ho + rows - 1) // rows
    n = item // (groups * ntiles)
    g = (item // ntiles) % groups
    r0 = (item % ntiles) * rows
    r1 = min(r0 + rows, ho)
    npix = (r1 - r0) * wo
    cols = np.empty((ck, npix), x.dtype)
    _fill_cols(x, n, g * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, wo, cols)
    gemm(
        False,
        False,
        og,
        npix,
        ck,
        1.0,
        wm,
        g * og * ck,
        ck,
        cols,
        0,
        npix,
        0.0,
        y,
        ((n * o + g * og) * ho + r0) * wo,
        ho * wo,
    )
    if has_bias:
        for oo in range(g * og, (g + 1) * og):
            b = bias[oo]
            for p in range(r0, r1):
                yr = y[n, oo, p]
                for q in range(wo):
                    yr[q] += b


@njit(cache=True, parallel=True)
def _fwd_par(x, wm, bias, has_bias, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, y):
    ntiles = (y.shape[2] + rows - 1) // rows
    for item in prange(x.shape[0] * groups * ntiles):
        _fwd_item(x, wm, bias, has_bias, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, y, item)


@njit(cache=True)
def _fwd_ser(x, wm, bias, has_bias, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, y):
    ntiles = (y.shape[2] + rows - 1) // rows
    for item in range(x.shape[0] * groups * ntiles):
        _fwd_item(x, wm, bias, has_bias, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, y, item)


@njit(inline="always", cache=True)
def _bwd_item(x, wm, dy, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, nchunks, dx, dwpart, item):
    nb, c = x.shape[0], x.shape[1]
    o, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
    cg, og = c // groups, o // groups
    ck = cg * kh * kw
    chunk, g = item // groups, item % groups
    ldc = rows * wo
    cols = np.empty((ck, ldc), x.dtype)
    dcols = np.empty((ck, ldc), x.dtype)
    for n in range(chunk * nb // nchunks, (chunk + 1) * nb // nchunks):
        for r0 in range(0, ho, rows):
            r1 = min(r0 + rows, ho)
            npix = (r1 - r0) * wo
            dyoff = ((n * o + g * og) * ho + r0) * wo
            _fill_cols(x, n, g * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, wo, cols)
            # dW_g += dY_tile · colsᵀ ; dcols = W_gᵀ · dY_tile (buffers of row stride rows·Wo)
            gemm(
                False,
                True,
                og,
                ck,
                npix,
                1.0,
                dy,
                dyoff,
                ho * wo,
                cols,
                0,
                ldc,
                1.0,
                dwpart,
                (chunk * o + g * og) * ck,
                ck,
            )
            gemm(
                True,
                False,
                ck,
                npix,
                og,
                1.0,
                wm,
                g * og * ck,
                ck,
                dy,
                dyoff,
                ho * wo,
                0.0,
                dcols,
                0,
                ldc,
            )
            _add_cols(dcols, n, g * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, wo, dx)


@njit(cache=True, parallel=True)
def _bwd_par(x, wm, dy, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, nchunks, dx, dwpart):
    for item in prange(nchunks * groups):
        _bwd_item(
            x, wm, dy, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, nchunks, dx, dwpart, item
        )


@njit(cache=True)
def _bwd_ser(x, wm, dy, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, nchunks, dx, dwpart):
    for item in range(nchunks * groups):
        _bwd_item(
            x, wm, dy, groups, kh, kw, sh, sw, ph, pw, dh, dw, rows, nchunks, dx, dwpart, item
        )


# -- Python side -----------------------------------------------------------------------------------


def _rows(ck, wo, ho):
    """Output rows per tile: a column buffer near TILE_ELEMENTS, but at least MIN_TILE_PIXELS
    pixels wide (narrower products waste BLAS on reloading the weights / dweight block)."""
    rows = max(TILE_ELEMENTS // max(ck * wo, 1), -(-MIN_TILE_PIXELS // wo))
    return max(1, min(ho, rows))


def _work(x, weight, ho, wo):
    n = x.shape[0]
    o, cg, kh, kw = weight.shape
    return n * o * cg * kh * kw * ho * wo


def conv2d_forward(
    x, weight, bias=None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1
):
    """Like the reference ``conv2d_forward`` for float32/float64 NumPy inputs (same dtype)."""
    from arrayattn._reference.primitives import conv2d_output_size

    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho, wo = conv2d_output_size((h, w), (kh, kw), stride, padding, dilation)
    xc = np.ascontiguousarray(x)
    wm = np.ascontiguousarray(weight).reshape(o, cg * kh * kw)
    y = np.empty((n, o, ho, wo), dtype=x.dtype)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias) if has_bias else np.zeros(1, x.dtype)
    kernel = _fwd_par if _work(x, weight, ho, wo) >= PARALLEL_MIN_WORK else _fwd_ser
    with single_threaded_blas():
        kernel(
            xc,
            wm,
            b,
            has_bias,
            groups,
            kh,
            kw,
            *stride,
            *padding,
            *dilation,
            _rows(cg * kh * kw, wo, ho),
            y,
        )
    return y


def conv2d_backward(
    x, weight, dy, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, with_bias=False
):
    """(dx, dweight, dbias) like the reference ``conv2d_backward``."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho, wo = dy.shape[-2], dy.shape[-1]
    xc = np.ascontiguousarray(x)
    wm = np.ascontiguousarray(weight).reshape(o, cg * kh * kw)
    dyc = np.ascontiguousarray(dy, dtype=x.dtype)
    nchunks = max(1, min(n, MAX_BWD_CHUNKS))
    dx = np.zeros_like(xc)
    dwpart = np.zeros((nchunks, o, cg * kh * kw), dtype=x.dtype)
    kernel = _bwd_par if _work(x, weight, ho, wo) >= PARALLEL_MIN_WORK else _bwd_ser
    with single_threaded_blas():
        kernel(
            xc,
            wm,
            dyc,
            groups,
            kh,
            kw,
            *stride,
            *padding,
            *dilation,
            _rows(cg * kh * kw, wo, ho),
            nchunks,
            dx,
            dwpart,
        )
    dwt = dwpart[0] if nchunks == 1 else np.sum(dwpart, axis=0)
    db = np.sum(dyc, axis=(0, 2, 3)) if with_bias else None
    return dx, dwt.reshape(o, cg, kh, kw), db


# -- Kernel ----------------------------------------------------------------------------------------


def _static(options):
    return dict(
        stride=options.stride,
        padding=options.padding,
        dilation=options.dilation,
        groups=options.groups,
    )


def _fwd(xp, arrays, options, save):
    y = conv2d_forward(arrays["x"], arrays["weight"], arrays["bias"], **_static(options))
    return (y,), ({"x": arrays["x"], "weight": arrays["weight"]} if save else {})


def _bwd(xp, saved, options, cotangents):
    dx, dw, db = conv2d_backward(
        saved["x"], saved["weight"], cotangents[0], **_static(options), with_bias=options.has_bias
    )
    return {"x": dx, "weight": dw, "bias": db}


KERNELS = {"conv2d": Kernel(_fwd, _bwd, requires=(BLAS,))}

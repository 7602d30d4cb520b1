"""Array-API reference forward/backward of the differentiable array primitives.

Plain ``xp.*`` functions (no in-place writes) that the public ops of :mod:`arrayattn.primitives`
run, and that other families' reference kernels call directly when they compose blocks (SE, CBAM,
non-local blocks, ...). Conventions:

* images are NCHW; weights use PyTorch layouts (``Linear.weight (out, in)``,
  ``Conv2d.weight (out, in/groups, kh, kw)``);
* every ``*_forward`` returns its output in the input dtype, computing in
  :func:`~arrayattn._xp.compute_dtype` (float32 for float16/bfloat16);
* every ``*_backward`` takes what its forward needs (the inputs, sometimes the output) and the
  output cotangent ``dy`` and returns the input gradients in the input dtypes;
* pairs (``stride``, ``padding``, ...) are ``(int, int)`` tuples — normalise with :func:`pair`;
* max operations route the gradient to the first maximum in row-major scan order of the window
  (PyTorch's CPU rule), so ties never double-count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_extra as xpx

from .._xp import Array, compute_dtype, device_of, flat_rows

__all__ = [
    "adaptive_avg_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_bins",
    "adaptive_max_pool2d_backward",
    "adaptive_max_pool2d_forward",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_output_size",
    "elu_backward",
    "elu_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "pad2d",
    "pair",
    "relu_backward",
    "relu_forward",
    "sigmoid_backward",
    "sigmoid_forward",
    "tanh_backward",
    "tanh_forward",
    "upsample_bilinear2d_backward",
    "upsample_bilinear2d_forward",
    "upsample_nearest2d_backward",
    "upsample_nearest2d_forward",
]

Pair = tuple[int, int]


def pair(value: int | Sequence[int]) -> Pair:
    """``3 -> (3, 3)``; ``(2, 1) -> (2, 1)``."""
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def _cast(xp: Any, x: Array, dtype: Any) -> Array:
    return xp.astype(x, dtype, copy=False)


# -- padding and strided scatter (the adjoint of strided slicing) -------------------------------


def pad2d(
    xp: Any, x: Array, top: int, bottom: int, left: int, right: int, value: float = 0.0
) -> Array:
    """Pad the last two axes with a constant (concatenation, no in-place writes)."""
    if top or bottom:
        parts = []
        shape = tuple(x.shape)
        if top:
            parts.append(
                xp.full(shape[:-2] + (top, shape[-1]), value, dtype=x.dtype, device=device_of(x))
            )
        parts.append(x)
        if bottom:
            parts.append(
                xp.full(shape[:-2] + (bottom, shape[-1]), value, dtype=x.dtype, device=device_of(x))
            )
        x = xp.concat(parts, axis=-2)
    if left or right:
        parts = []
        shape = tuple(x.shape)
        if left:
            parts.append(xp.full(shape[:-1] + (left,), value, dtype=x.dtype, device=device_of(x)))
        parts.append(x)
        if right:
            parts.append(xp.full(shape[:-1] + (right,), value, dtype=x.dtype, device=device_of(x)))
        x = xp.concat(parts, axis=-1)
    return x


def _dilate(xp: Any, g: Array, stride: Pair) -> Array:
    """Insert ``stride - 1`` zeros between the entries of the last two axes."""
    sh, sw = stride
    if sh == 1 and sw == 1:
        return g
    shape = tuple(g.shape)
    lead, ho, wo = shape[:-2], shape[-2], shape[-1]
    g = xp.reshape(g, lead + (ho, 1, wo, 1))
    z = xp.zeros(lead + (ho, sh, wo, sw), dtype=g.dtype, device=device_of(g))
    g = g + z
    g = xp.reshape(g, lead + (ho * sh, wo * sw))
    # zero everywhere except offset 0 of each stride cell
    keep_h = (xp.arange(ho * sh, device=device_of(g)) % sh) == 0
    keep_w = (xp.arange(wo * sw, device=device_of(g)) % sw) == 0
    keep = xp.logical_and(keep_h[:, None], keep_w[None, :])
    g = xp.where(keep, g, xp.zeros((), dtype=g.dtype, device=device_of(g)))
    return g[..., : (ho - 1) * sh + 1, : (wo - 1) * sw + 1]


def _place(xp: Any, g: Array, r0: int, c0: int, stride: Pair, hp: int, wp: int) -> Array:
    """Adjoint of ``x[..., r0::sh, c0::sw][..., :Ho, :Wo]`` for x of spatial size (hp, wp)."""
    g = _dilate(xp, g, stride)
    h, w = g.shape[-2], g.shape[-1]
    return pad2d(xp, g, r0, hp - r0 - h, c0, wp - c0 - w)


def _window_slices(x: Array, kernel: Pair, stride: Pair, dilation: Pair, out: Pair):
    """(i, j, x[..., window offset (i, j) sampled at every output position]) for each offset."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            yield i, j, x[..., r0 : r0 + sh * (ho - 1) + 1 : sh, c0 : c0 + sw * (wo - 1) + 1 : sw]


def conv2d_output_size(
    size: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Pair:
    """PyTorch's output size ``floor((H + 2p - d(k-1) - 1) / s) + 1`` per axis."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = size, kernel, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


# -- linear ---------------------------------------------------------------------------------------


def linear_forward(xp: Any, x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``y = x weightᵀ + bias`` (PyTorch ``Linear``): x (..., in), weight (out, in), bias (out,)."""
    cdt = compute_dtype(xp, x.dtype)
    y = xp.matmul(_cast(xp, x, cdt), xp.matrix_transpose(_cast(xp, weight, cdt)))
    if bias is not None:
        y = y + _cast(xp, bias, cdt)
    return xp.astype(y, x.dtype)


def linear_backward(
    xp: Any, x: Array, weight: Array, dy: Array, with_bias: bool = False
) -> tuple[Array, Array, Array | None]:
    """Gradients of :func:`linear_forward`: ``(dx, dweight, dbias)`` (dbias None unless
    with_bias)."""
    cdt = compute_dtype(xp, x.dtype)
    dyc = _cast(xp, dy, cdt)
    dx = xp.matmul(dyc, _cast(xp, weight, cdt))
    flat_dy, flat_x = flat_rows(xp, dyc), flat_rows(xp, _cast(xp, x, cdt))
    dw = xp.matmul(xp.matrix_transpose(flat_dy), flat_x)
    db = xp.astype(xp.sum(flat_dy, axis=0), x.dtype) if with_bias else None
    return xp.astype(dx, x.dtype), xp.astype(dw, x.dtype), db


# -- layer norm -----------------------------------------------------------------------------------


def layer_norm_forward(
    xp: Any, x: Array, weight: Array | None = None, bias: Array | None = None, eps: float = 1e-5
) -> tuple[Array, Array, Array]:
    """Layer norm over the last axis. Returns ``(y, mean, rstd)``; mean/rstd (..., 1) in the compute
    dtype (``rstd = 1/sqrt(var + eps)``, biased variance as in PyTorch)."""
    cdt = compute_dtype(xp, x.dtype)
    xc = _cast(xp, x, cdt)
    mean = xp.mean(xc, axis=-1, keepdims=True)
    centred = xc - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    y = centred * rstd
    if weight is not None:
        y = y * _cast(xp, weight, cdt)
    if bias is not None:
        y = y + _cast(xp, bias, cdt)
    return xp.astype(y, x.dtype), mean, rstd


def layer_norm_backward(
    xp: Any,
    x: Array,
    weight: Array | None,
    mean: Array,
    rstd: Array,
    dy: Array,
    with_bias: bool = False,
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of :func:`layer_norm_forward`: ``(dx, dweight, dbias)``.

    With ``x̂ = (x - mean)·rstd`` and ``g = dy ⊙ weight``:
    ``dx = rstd (g - mean(g) - x̂ mean(g ⊙ x̂))``, ``dweight = Σ dy ⊙ x̂``, ``dbias = Σ dy``.
    """
    cdt = compute_dtype(xp, x.dtype)
    xhat = (_cast(xp, x, cdt) - mean) * rstd
    dyc = _cast(xp, dy, cdt)
    g = dyc * _cast(xp, weight, cdt) if weight is not None else dyc
    dx = rstd * (
        g - xp.mean(g, axis=-1, keepdims=True) - xhat * xp.mean(g * xhat, axis=-1, keepdims=True)
    )
    lead = tuple(range(x.ndim - 1))
    dw = xp.astype(xp.sum(dyc * xhat, axis=lead), x.dtype) if weight is not None else None
    db = xp.astype(xp.sum(dyc, axis=lead), x.dtype) if with_bias else None
    return xp.astype(dx, x.dtype), dw, db


# -- activations ----------------------------------------------------------------------------------


def sigmoid_forward(xp: Any, x: Array) -> Array:
    """Logistic sigmoid, overflow-free for either sign (``e = exp(-|x|)``)."""
    cdt = compute_dtype(xp, x.dtype)
    xc = _cast(xp, x, cdt)
    e = xp.exp(-xp.abs(xc))
    y = xp.where(xc >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return xp.astype(y, x.dtype)


def sigmoid_backward(xp: Any, y: Array, dy: Array) -> Array:
    """``dx = dy ⊙ y (1 - y)`` from the output ``y``."""
    cdt = compute_dtype(xp, y.dtype)
    yc = _cast(xp, y, cdt)
    return xp.astype(_cast(xp, dy, cdt) * yc * (1.0 - yc), y.dtype)


def relu_forward(xp: Any, x: Array) -> Array:
    return xp.where(x > 0, x, xp.zeros((), dtype=x.dtype, device=device_of(x)))


def relu_backward(xp: Any, x: Array, dy: Array) -> Array:
    """``dx = dy ⊙ 1[x > 0]`` (subgradient 0 at 0, as PyTorch)."""
    return xp.where(x > 0, dy, xp.zeros((), dtype=dy.dtype, device=device_of(dy)))


def tanh_forward(xp: Any, x: Array) -> Array:
    return xp.tanh(x)


def tanh_backward(xp: Any, y: Array, dy: Array) -> Array:
    """``dx = dy ⊙ (1 - y²)`` from the output ``y``."""
    cdt = compute_dtype(xp, y.dtype)
    yc = _cast(xp, y, cdt)
    return xp.astype(_cast(xp, dy, cdt) * (1.0 - yc * yc), y.dtype)


def elu_forward(xp: Any, x: Array, alpha: float = 1.0) -> Array:
    """``x`` for x > 0, ``alpha (exp(x) - 1)`` otherwise."""
    cdt = compute_dtype(xp, x.dtype)
    xc = _cast(xp, x, cdt)
    neg = alpha * xp.expm1(xp.minimum(xc, xp.zeros((), dtype=cdt, device=device_of(x))))
    return xp.astype(xp.where(xc > 0, xc, neg), x.dtype)


def elu_backward(xp: Any, x: Array, dy: Array, alpha: float = 1.0) -> Array:
    """``dx = dy`` for x > 0, ``dy ⊙ alpha exp(x)`` otherwise."""
    cdt = compute_dtype(xp, x.dtype)
    xc = _cast(xp, x, cdt)
    slope = alpha * xp.exp(xp.minimum(xc, xp.zeros((), dtype=cdt, device=device_of(x))))
    dyc = _cast(xp, dy, cdt)
    return xp.astype(xp.where(xc > 0, dyc, dyc * slope), x.dtype)


# -- conv2d ---------------------------------------------------------------------------------------


def _conv_cols(xp, xc, kernel, stride, padding, dilation, out, groups):
    """(G, Cg·kh·kw, N·Ho·Wo) columns of ``xc`` (N, C, H, W), rows ordered like the weight (c, i,
    j).

    Channel-major (C, N, ...) layout, so that one matrix product per group covers the whole batch
    (a batched product over N with broadcast weights is several times slower in NumPy). The input
    is transposed and zero-padded in one pass (a scatter into zeros); each kernel offset is then one
    strided slice of it.
    """
    n, c, h, w = xc.shape
    (kh, kw), (ph, pw), (ho, wo) = kernel, padding, out
    xt = xp.permute_dims(xc, (1, 0, 2, 3))  # (C, N, H, W)
    if ph or pw:
        zeros = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=xc.dtype, device=device_of(xc))
        xt = xpx.at(zeros, (..., slice(ph, ph + h), slice(pw, pw + w))).set(xt)
    if (kh, kw) == (1, 1):
        cols = xt[..., :: stride[0], :: stride[1]][..., :ho, :wo]
    else:
        slices = [s for _, _, s in _window_slices(xt, kernel, stride, dilation, out)]
        cols = xp.stack(slices, axis=1)  # (C, kh·kw, N, Ho, Wo)
    return xp.reshape(cols, (groups, (c // groups) * kh * kw, n * ho * wo))


def _nchw(xp, y, n, o, ho, wo):
    """(O, N·Ho·Wo) → C-contiguous (N, O, Ho, Wo) (the reshape of the transposed view copies)."""
    y = xp.permute_dims(xp.reshape(y, (o, n, ho * wo)), (1, 0, 2))
    return xp.reshape(xp.reshape(y, (n, o * ho * wo)), (n, o, ho, wo))


def conv2d_forward(
    xp: Any,
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> Array:
    """2-D cross-correlation as ``torch.nn.functional.conv2d`` (zero padding).

    x (N, C, H, W), weight (O, C/groups, kh, kw), bias (O,) → y (N, O, Ho, Wo). im2col by one
    strided slice per kernel offset into (G, Cg·kh·kw, N·Ho·Wo) columns, then one matrix product
    per group over the whole batch.
    """
    cdt = compute_dtype(xp, x.dtype)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho, wo = conv2d_output_size((h, w), (kh, kw), stride, padding, dilation)
    cols = _conv_cols(xp, _cast(xp, x, cdt), (kh, kw), stride, padding, dilation, (ho, wo), groups)
    wm = xp.reshape(_cast(xp, weight, cdt), (groups, o // groups, cg * kh * kw))
    y = xp.reshape(xp.matmul(wm, cols), (o, n * ho * wo))  # (G, Og, N·Ho·Wo)
    if bias is not None:
        y = y + xp.reshape(_cast(xp, bias, cdt), (o, 1))
    return _cast(xp, _nchw(xp, y, n, o, ho, wo), x.dtype)  # a fresh array: no copy needed


def conv2d_backward(
    xp: Any,
    x: Array,
    weight: Array,
    dy: Array,
    *,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    with_bias: bool = False,
) -> tuple[Array, Array, Array | None]:
    """Gradients of :func:`conv2d_forward`: ``(dx, dweight, dbias)``.

    ``dweight = dY cols(x)ᵀ`` (one product over the whole batch, computed as ``(cols dYᵀ)ᵀ`` with
    both operands C-contiguous); ``dcols = Wᵀ dY`` and ``dx``
    is its col2im: each kernel offset's slice scatter-added (``array_api_extra.at``) where forward
    read it, then the padding cropped.
    """
    cdt = compute_dtype(xp, x.dtype)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho, wo = dy.shape[-2], dy.shape[-1]
    og = o // groups
    ph, pw = padding
    (sh, sw), (dh, dw_) = stride, dilation
    # Every matmul operand is made C-contiguous (a reshape of a transposed view copies): NumPy
    # falls back to a loop far slower than BLAS for some transposed operands.
    dy4 = xp.reshape(_cast(xp, dy, cdt), (n, groups, og, ho * wo))
    dyt = xp.reshape(xp.permute_dims(dy4, (1, 2, 0, 3)), (groups, og, n * ho * wo))
    dyt_t = xp.reshape(xp.permute_dims(dy4, (1, 0, 3, 2)), (groups, n * ho * wo, og))
    cols = _conv_cols(xp, _cast(xp, x, cdt), (kh, kw), stride, padding, dilation, (ho, wo), groups)
    dw = xp.matrix_transpose(xp.matmul(cols, dyt_t))  # (G, Og, Cg·K)
    dw = xp.reshape(
        xp.reshape(dw, (o * cg * kh * kw,)), (o, cg, kh, kw)
    )  # flattening copies: C order
    db = xp.astype(xp.reshape(xp.sum(dy4, axis=(0, 3)), (o,)), x.dtype) if with_bias else None
    wm = xp.reshape(_cast(xp, weight, cdt), (groups, og, cg * kh * kw))
    wm_t = xp.reshape(
        xp.reshape(xp.matrix_transpose(wm), (o * cg * kh * kw,)), (groups, cg * kh * kw, og)
    )
    dcols = xp.reshape(xp.matmul(wm_t, dyt), (c, kh * kw, n, ho, wo))
    hp, wp = h + 2 * ph, w + 2 * pw
    dxp = xp.zeros((c, n, hp, wp), dtype=cdt, device=device_of(dcols))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw_
            idx = (
                ...,
                slice(r0, r0 + sh * (ho - 1) + 1, sh),
                slice(c0, c0 + sw * (wo - 1) + 1, sw),
            )
            dxp = xpx.at(dxp, idx).add(dcols[:, i * kw + j, ...])
    dx = dxp[..., ph : ph + h, pw : pw + w]  # (C, N, H, W)
    dx = xp.reshape(xp.reshape(xp.permute_dims(dx, (1, 0, 2, 3)), (n, c * h * w)), (n, c, h, w))
    return _cast(xp, dx, x.dtype), xp.astype(dw, x.dtype), db


# -- max / average pooling ------------------------------------------------------------------------


def max_pool2d_forward(
    xp: Any,
    x: Array,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
) -> Array:
    """Max pooling as ``torch.nn.functional.max_pool2d`` (implicit ``-inf`` padding, floor mode)."""
    h, w = x.shape[-2], x.shape[-1]
    out = conv2d_output_size((h, w), kernel_size, stride, padding, dilation)
    xpad = pad2d(xp, x, padding[0], padding[0], padding[1], padding[1], -math.inf)
    y = None
    for _, _, s in _window_slices(xpad, kernel_size, stride, dilation, out):
        y = s if y is None else xp.maximum(y, s)
    return y + xp.zeros((), dtype=x.dtype, device=device_of(x))  # a fresh array even for k = 1


def max_pool2d_backward(
    xp: Any,
    x: Array,
    y: Array,
    dy: Array,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
) -> Array:
    """Routes each ``dy`` to the first maximum of its window in row-major scan order."""
    h, w = x.shape[-2], x.shape[-1]
    out = conv2d_output_size((h, w), kernel_size, stride, padding, dilation)
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    xpad = pad2d(xp, x, padding[0], padding[0], padding[1], padding[1], -math.inf)
    zero = xp.zeros((), dtype=dy.dtype, device=device_of(dy))
    taken = xp.zeros(y.shape, dtype=xp.bool, device=device_of(x))
    dxp: Any = None
    for i, j, s in _window_slices(xpad, kernel_size, stride, dilation, out):
        hit = xp.logical_and(s == y, xp.logical_not(taken))
        taken = xp.logical_or(taken, hit)
        part = _place(xp, xp.where(hit, dy, zero), i * dilation[0], j * dilation[1], stride, hp, wp)
        dxp = part if dxp is None else dxp + part
    return dxp[..., padding[0] : padding[0] + h, padding[1] : padding[1] + w]


def _avg_divisor(xp, x, kernel_size, stride, padding, count_include_pad, out):
    if count_include_pad or padding == (0, 0):
        return float(kernel_size[0] * kernel_size[1])
    h, w = x.shape[-2], x.shape[-1]
    ones = pad2d(
        xp,
        xp.ones((h, w), dtype=compute_dtype(xp, x.dtype), device=device_of(x)),
        padding[0],
        padding[0],
        padding[1],
        padding[1],
    )
    count = None
    for _, _, s in _window_slices(ones, kernel_size, stride, (1, 1), out):
        count = s if count is None else count + s
    return count


def avg_pool2d_forward(
    xp: Any,
    x: Array,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair = (0, 0),
    count_include_pad: bool = True,
) -> Array:
    """Average pooling as ``torch.nn.functional.avg_pool2d`` (zero padding, floor mode)."""
    cdt = compute_dtype(xp, x.dtype)
    h, w = x.shape[-2], x.shape[-1]
    out = conv2d_output_size((h, w), kernel_size, stride, padding, (1, 1))
    xpad = pad2d(xp, _cast(xp, x, cdt), padding[0], padding[0], padding[1], padding[1])
    total = None
    for _, _, s in _window_slices(xpad, kernel_size, stride, (1, 1), out):
        total = s if total is None else total + s
    y = total / _avg_divisor(xp, x, kernel_size, stride, padding, count_include_pad, out)
    return xp.astype(y, x.dtype)


def avg_pool2d_backward(
    xp: Any,
    x: Array,
    dy: Array,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair = (0, 0),
    count_include_pad: bool = True,
) -> Array:
    """Spreads ``dy / divisor`` uniformly over each window."""
    cdt = compute_dtype(xp, x.dtype)
    h, w = x.shape[-2], x.shape[-1]
    out = (dy.shape[-2], dy.shape[-1])
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    g = _cast(xp, dy, cdt) / _avg_divisor(
        xp, x, kernel_size, stride, padding, count_include_pad, out
    )
    dxp: Any = None
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            part = _place(xp, g, i, j, stride, hp, wp)
            dxp = part if dxp is None else dxp + part
    return xp.astype(dxp[..., padding[0] : padding[0] + h, padding[1] : padding[1] + w], x.dtype)


# -- adaptive pooling -----------------------------------------------------------------------------


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins: ``[floor(i·size/out), ceil((i+1)·size/out))``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _bin_matrix(xp, size, out, dtype, device):
    """(out, size) averaging matrix of the adaptive bins (rows sum to 1; bins may overlap)."""
    rows = []
    for start, end in adaptive_bins(size, out):
        rows.append([1.0 / (end - start) if start <= k < end else 0.0 for k in range(size)])
    return xp.asarray(rows, dtype=dtype, device=device)


def adaptive_avg_pool2d_forward(xp: Any, x: Array, output_size: Pair) -> Array:
    """``y = A_h x A_wᵀ`` with the bin-averaging matrices of :func:`adaptive_bins`."""
    cdt = compute_dtype(xp, x.dtype)
    h, w = x.shape[-2], x.shape[-1]
    oh, ow = output_size
    xc = _cast(xp, x, cdt)
    if (oh, ow) == (1, 1):
        return xp.astype(xp.mean(xc, axis=(-2, -1), keepdims=True), x.dtype)
    ah = _bin_matrix(xp, h, oh, cdt, device_of(x))
    aw = _bin_matrix(xp, w, ow, cdt, device_of(x))
    y = xp.matmul(xp.matmul(ah, xc), xp.matrix_transpose(aw))
    return xp.astype(y, x.dtype)


def adaptive_avg_pool2d_backward(xp: Any, x_shape: Sequence[int], dy: Array) -> Array:
    """``dx = A_hᵀ dy A_w`` (a uniform spread over each bin, summed where bins overlap)."""
    cdt = compute_dtype(xp, dy.dtype)
    h, w = x_shape[-2], x_shape[-1]
    oh, ow = dy.shape[-2], dy.shape[-1]
    dyc = _cast(xp, dy, cdt)
    if (oh, ow) == (1, 1):
        dx = xp.broadcast_to(dyc / float(h * w), tuple(dy.shape[:-2]) + (h, w))
        return xp.astype(dx, dy.dtype, copy=True)
    ah = _bin_matrix(xp, h, oh, cdt, device_of(dy))
    aw = _bin_matrix(xp, w, ow, cdt, device_of(dy))
    dx = xp.matmul(xp.matmul(xp.matrix_transpose(ah), dyc), aw)
    return xp.astype(dx, dy.dtype)


def adaptive_max_pool2d_forward(xp: Any, x: Array, output_size: Pair) -> tuple[Array, Array]:
    """Adaptive max pooling. Returns ``(y, index)``: index (int64, like y) is the flat position
    ``h·W + w`` of the first maximum of each bin (PyTorch's ``return_indices``)."""
    h, w = x.shape[-2], x.shape[-1]
    lead = tuple(x.shape[:-2])
    ys, idx = [], []
    for h0, h1 in adaptive_bins(h, output_size[0]):
        for w0, w1 in adaptive_bins(w, output_size[1]):
            bw = w1 - w0
            s = xp.reshape(x[..., h0:h1, w0:w1], lead + ((h1 - h0) * bw,))
            a = xp.argmax(s, axis=-1)
            ys.append(xp.max(s, axis=-1))
            idx.append((h0 + a // bw) * w + (w0 + a % bw))
    shape = lead + tuple(output_size)
    y = xp.reshape(xp.stack(ys, axis=-1), shape)
    index = xp.astype(xp.reshape(xp.stack(idx, axis=-1), shape), xp.int64)
    return y, index


def adaptive_max_pool2d_backward(xp: Any, x_shape: Sequence[int], index: Array, dy: Array) -> Array:
    """Routes each ``dy`` to its bin's argmax ``index`` (summing where bins overlap)."""
    h, w = x_shape[-2], x_shape[-1]
    lead = tuple(dy.shape[:-2])
    nbins = dy.shape[-2] * dy.shape[-1]
    flat_dy = xp.reshape(dy, lead + (nbins,))
    flat_idx = xp.reshape(index, lead + (nbins,))
    positions = xp.arange(h * w, dtype=xp.int64, device=device_of(dy))
    zero = xp.zeros((), dtype=dy.dtype, device=device_of(dy))
    dx = None
    for b in range(nbins):
        part = xp.where(flat_idx[..., b : b + 1] == positions, flat_dy[..., b : b + 1], zero)
        dx = part if dx is None else dx + part
    return xp.reshape(dx, lead + (h, w))


# -- upsampling -----------------------------------------------------------------------------------


def _src_scale(size: int, out: int, scale_factor: float | None) -> float:
    """PyTorch's source-index scale: ``1/scale_factor`` when given, else ``size/out``."""
    return 1.0 / scale_factor if scale_factor else size / out


def _nearest_matrix(xp, size, out, scale_factor, dtype, device):
    scale = _src_scale(size, out, scale_factor)
    src = [min(int(math.floor(i * scale)), size - 1) for i in range(out)]
    return xp.asarray(
        [[1.0 if k == s else 0.0 for k in range(size)] for s in src], dtype=dtype, device=device
    )


def _bilinear_matrix(xp, size, out, scale_factor, align_corners, dtype, device):
    rows = []
    for i in range(out):
        if align_corners:
            src = i * (size - 1) / (out - 1) if out > 1 else 0.0
        else:
            src = max((i + 0.5) * _src_scale(size, out, scale_factor) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size - 1)
        i1 = min(i0 + 1, size - 1)
        lam = src - i0
        row = [0.0] * size
        row[i0] += 1.0 - lam
        row[i1] += lam
        rows.append(row)
    return xp.asarray(rows, dtype=dtype, device=device)


def _resample(xp, x, mh, mw, cdt):
    y = xp.matmul(xp.matmul(mh, _cast(xp, x, cdt)), xp.matrix_transpose(mw))
    return xp.astype(y, x.dtype)


def _resample_adjoint(xp, dy, mh, mw, cdt):
    dx = xp.matmul(xp.matmul(xp.matrix_transpose(mh), _cast(xp, dy, cdt)), mw)
    return xp.astype(dx, dy.dtype)


def upsample_nearest2d_forward(
    xp: Any, x: Array, size: Pair, scale_factor: tuple[float, float] | None = None
) -> Array:
    """``F.interpolate(x, size, mode='nearest')``: source index ``min(floor(i·scale), H-1)``,
    written as ``y = U_h x U_wᵀ`` with 0/1 selection matrices."""
    cdt = compute_dtype(xp, x.dtype)
    sf = scale_factor or (None, None)
    mh = _nearest_matrix(xp, x.shape[-2], size[0], sf[0], cdt, device_of(x))
    mw = _nearest_matrix(xp, x.shape[-1], size[1], sf[1], cdt, device_of(x))
    return _resample(xp, x, mh, mw, cdt)


def upsample_nearest2d_backward(
    xp: Any, x_shape: Sequence[int], dy: Array, scale_factor: tuple[float, float] | None = None
) -> Array:
    """``dx = U_hᵀ dy U_w``: each input pixel sums the gradients of the pixels copied from it."""
    cdt = compute_dtype(xp, dy.dtype)
    sf = scale_factor or (None, None)
    mh = _nearest_matrix(xp, x_shape[-2], dy.shape[-2], sf[0], cdt, device_of(dy))
    mw = _nearest_matrix(xp, x_shape[-1], dy.shape[-1], sf[1], cdt, device_of(dy))
    return _resample_adjoint(xp, dy, mh, mw, cdt)


def upsample_bilinear2d_forward(
    xp: Any,
    x: Array,
    size: Pair,
    align_corners: bool = False,
    scale_factor: tuple[float, float] | None = None,
) -> Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=...)`` as ``y = B_h x B_wᵀ``."""
    cdt = compute_dtype(xp, x.dtype)
    sf = scale_factor or (None, None)
    mh = _bilinear_matrix(xp, x.shape[-2], size[0], sf[0], align_corners, cdt, device_of(x))
    mw = _bilinear_matrix(xp, x.shape[-1], size[1], sf[1], align_corners, cdt, device_of(x))
    return _resample(xp, x, mh, mw, cdt)


def upsample_bilinear2d_backward(
    xp: Any,
    x_shape: Sequence[int],
    dy: Array,
    align_corners: bool = False,
    scale_factor: tuple[float, float] | None = None,
) -> Array:
    """``dx = B_hᵀ dy B_w``."""
    cdt = compute_dtype(xp, dy.dtype)
    sf = scale_factor or (None, None)
    mh = _bilinear_matrix(xp, x_shape[-2], dy.shape[-2], sf[0], align_corners, cdt, device_of(dy))
    mw = _bilinear_matrix(xp, x_shape[-1], dy.shape[-1], sf[1], align_corners, cdt, device_of(dy))
    return _resample_adjoint(xp, dy, mh, mw, cdt)

"""Differentiable array primitives: convolution, pooling, upsampling, linear, layer norm,
activations.

Each is an op with a hand-derived backward (``op.fwd`` / ``op.bwd``), so users can compose their
own blocks from them; weights use PyTorch layouts and semantics follow ``torch.nn.functional``.
The plain ``xp``-level forward/backward functions behind them are in
``arrayattn._reference.primitives`` (for kernels of other ops that compose these).
"""

from __future__ import annotations

import math

from . import _checks as checks
from ._glue.primitives import (
    ADAPTIVE_AVG_REFERENCE,
    ADAPTIVE_AVG_RESIDUALS,
    ADAPTIVE_MAX_REFERENCE,
    ADAPTIVE_MAX_RESIDUALS,
    AVG_POOL_REFERENCE,
    AVG_POOL_RESIDUALS,
    BILINEAR_REFERENCE,
    CONV2D_REFERENCE,
    CONV2D_RESIDUALS,
    ELU_REFERENCE,
    LAYER_NORM_REFERENCE,
    LAYER_NORM_RESIDUALS,
    LINEAR_REFERENCE,
    LINEAR_RESIDUALS,
    MAX_POOL_REFERENCE,
    MAX_POOL_RESIDUALS,
    NEAREST_REFERENCE,
    RELU_REFERENCE,
    RESIZE_RESIDUALS,
    SIGMOID_REFERENCE,
    TANH_REFERENCE,
    UNARY_RESIDUALS,
    AdaptivePoolOptions,
    AvgPoolOptions,
    BilinearOptions,
    Conv2dOptions,
    EluOptions,
    LayerNormOptions,
    LinearOptions,
    MaxPoolOptions,
    NearestOptions,
    conv2d_output_size,
)
from ._kernel import Call, NoOptions
from ._op import op
from ._xp import Array

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "avg_pool2d",
    "conv2d",
    "elu",
    "layer_norm",
    "linear",
    "max_pool2d",
    "relu",
    "sigmoid",
    "tanh",
    "upsample_bilinear2d",
    "upsample_nearest2d",
]


# -- argument helpers -----------------------------------------------------------------------------


def _pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
        return (
            checks.check_int(name, value[0], minimum=minimum),
            checks.check_int(name, value[1], minimum=minimum),
        )
    v = checks.check_int(name, value, minimum=minimum)
    return (v, v)


def _image(name: str, x: Array, *, exact: bool = True) -> None:
    if exact:
        checks.check_ndim(name, x, 4, "(N, C, H, W)", exact=True)
    else:
        checks.check_ndim(name, x, 2, "(..., H, W)")


def _floating(**arrays):
    xp = checks.namespace(**arrays)
    for name, a in arrays.items():
        if a is not None:
            checks.check_floating(xp, name, a)
    checks.check_same_dtype(**arrays)
    return xp


# -- conv2d ---------------------------------------------------------------------------------------


def _conv_examples(rng):
    x = rng.standard_normal((2, 4, 7, 6))
    return [
        ((x, rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3)), {"padding": 1}),
        (
            (x, rng.standard_normal((6, 2, 3, 2))),
            {"stride": (2, 1), "dilation": (1, 2), "groups": 2},
        ),
        ((x, rng.standard_normal((4, 1, 3, 3))), {"padding": 1, "groups": 4}),
        ((x, rng.standard_normal((5, 4, 1, 1)), rng.standard_normal(5)), {"stride": 2}),
    ]


@op(
    differentiable=("x", "weight", "bias"),
    reference=CONV2D_REFERENCE,
    residuals=CONV2D_RESIDUALS,
    examples=_conv_examples,
)
def conv2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Call[Array]:
    r"""2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``.

    ``y[n, o] = bias[o] + Σ_{c ∈ group(o), i, j} weight[o, c, i, j] ·
    x_pad[n, c, s_h·p + d_h·i, s_w·q + d_w·j]`` with zero padding.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    weight : array, shape (O, C/groups, kh, kw)
        PyTorch ``Conv2d.weight`` layout.
    bias : array, shape (O,), optional
    stride, padding, dilation : int or (int, int)
        As in PyTorch (``padding`` is symmetric zero padding).
    groups : int, default 1
        Divides both C and O; ``groups = C`` with ``weight (C·m, 1, kh, kw)`` is a depthwise
        convolution.

    Returns
    -------
    y : array, shape (N, O, Ho, Wo)
        ``Ho = floor((H + 2 p_h - d_h (kh - 1) - 1) / s_h) + 1``, likewise ``Wo``.

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` input channels, ``O`` output channels, ``H, W`` input size,
    ``kh, kw`` kernel size, ``Ho, Wo`` output size. Gradients for ``x``, ``weight`` and ``bias``.
    The reference runs im2col (one strided slice per kernel offset) and one matrix product per
    group; backward is the adjoint (col2im). Derivation: *Primitives: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    >>> w = rng.standard_normal((6, 2, 3, 3), dtype=np.float32)
    >>> y, res = aa.conv2d.fwd(x, w, padding=1, groups=2)
    >>> g = aa.conv2d.bwd(res, np.ones_like(y))
    >>> y.shape, g.x.shape, g.weight.shape, g.bias
    ((2, 6, 8, 8), (2, 4, 8, 8), (6, 2, 3, 3), None)
    """
    xp = _floating(x=x, weight=weight, bias=bias)
    _image("x", x)
    checks.check_ndim("weight", weight, 4, "(O, C/groups, kh, kw)", exact=True)
    groups = checks.check_int("groups", groups, minimum=1)
    stride = _pair("stride", stride, minimum=1)
    padding = _pair("padding", padding, minimum=0)
    dilation = _pair("dilation", dilation, minimum=1)
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c % groups:
        raise ValueError(f"groups: expected a divisor of the {c} input channels of x, got {groups}")
    if o % groups or cg != c // groups:
        raise ValueError(
            f"weight: expected shape (O, C/groups, kh, kw) = "
            f"(a multiple of {groups}, {c // groups}, kh, kw), "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        checks.check_ndim("bias", bias, 1, "(O,)", exact=True)
        if bias.shape[0] != o:
            raise ValueError(
                f"bias: expected shape ({o},) (O from weight), got {tuple(bias.shape)}"
            )
    ho, wo = conv2d_output_size((h, w), (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"x: spatial size {(h, w)} is too small for kernel {(kh, kw)} with dilation {dilation} "
            f"and padding {padding}"
        )
    return Call(
        xp,
        {"x": x, "weight": weight, "bias": bias},
        Conv2dOptions(
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            has_bias=bias is not None,
        ),
    )


# -- linear ---------------------------------------------------------------------------------------


def _linear_examples(rng):
    return [
        ((rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)), {}),
        ((rng.standard_normal(5), rng.standard_normal((2, 5))), {}),
    ]


@op(
    differentiable=("x", "weight", "bias"),
    reference=LINEAR_REFERENCE,
    residuals=LINEAR_RESIDUALS,
    examples=_linear_examples,
)
def linear(x: Array, weight: Array, bias: Array | None = None) -> Call[Array]:
    r"""Affine map ``y = x weightᵀ + bias``, as ``torch.nn.functional.linear``.

    Parameters
    ----------
    x : array, shape (..., in)
    weight : array, shape (out, in)
        PyTorch ``Linear.weight`` layout.
    bias : array, shape (out,), optional

    Returns
    -------
    y : array, shape (..., out)

    Notes
    -----
    Shape legend: ``...`` any leading dimensions, ``in``/``out`` feature widths. Gradients:
    ``dx = dy weight``, ``dweight = Σ dyᵀ x``, ``dbias = Σ dy`` (sums over the leading dims).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> x, w = np.ones((2, 3)), np.arange(12.0).reshape(4, 3)
    >>> aa.linear(x, w)
    array([[ 3., 12., 21., 30.],
           [ 3., 12., 21., 30.]])
    """
    xp = _floating(x=x, weight=weight, bias=bias)
    checks.check_ndim("x", x, 1, "(..., in)")
    checks.check_ndim("weight", weight, 2, "(out, in)", exact=True)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected shape (out, in) with in = {x.shape[-1]} (last dim of x), got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias: expected shape ({weight.shape[0]},) (out from weight), got {tuple(bias.shape)}"
        )
    return Call(
        xp, {"x": x, "weight": weight, "bias": bias}, LinearOptions(has_bias=bias is not None)
    )


# -- layer norm -----------------------------------------------------------------------------------


def _ln_examples(rng):
    return [
        ((rng.standard_normal((2, 3, 6)), rng.standard_normal(6), rng.standard_normal(6)), {}),
        ((rng.standard_normal((4, 5)),), {"eps": 1e-3}),
    ]


@op(
    differentiable=("x", "weight", "bias"),
    reference=LAYER_NORM_REFERENCE,
    residuals=LAYER_NORM_RESIDUALS,
    examples=_ln_examples,
)
def layer_norm(
    x: Array, weight: Array | None = None, bias: Array | None = None, *, eps: float = 1e-5
) -> Call[Array]:
    r"""Layer normalisation over the last axis, as ``F.layer_norm(x, (d,), weight, bias, eps)``.

    ``y = (x - mean) / sqrt(var + eps) ⊙ weight + bias`` with the biased variance.

    Parameters
    ----------
    x : array, shape (..., d)
    weight, bias : array, shape (d,), optional
    eps : float, default 1e-5

    Returns
    -------
    y : array, shape (..., d)

    Notes
    -----
    Shape legend: ``...`` leading dimensions, ``d`` the normalised width. Statistics in float32 for
    low-precision inputs. Gradients for ``x``, ``weight`` and ``bias``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.layer_norm(np.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
    array([[-1.2247,  0.    ,  1.2247]])
    """
    xp = _floating(x=x, weight=weight, bias=bias)
    checks.check_ndim("x", x, 1, "(..., d)")
    d = x.shape[-1]
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None and tuple(a.shape) != (d,):
            raise ValueError(
                f"{name}: expected shape ({d},) (the last dim of x), got {tuple(a.shape)}"
            )
    eps = checks.check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
    return Call(
        xp,
        {"x": x, "weight": weight, "bias": bias},
        LayerNormOptions(eps=eps, has_bias=bias is not None),
    )


# -- activations ----------------------------------------------------------------------------------


def _act_examples(rng):
    x = rng.standard_normal((3, 5)) * 2
    x = x + 0.01 * (x >= 0) - 0.01 * (x < 0)  # keep clear of the kink at 0
    return [((x,), {})]


def _prepare_unary(x):
    xp = checks.namespace(x=x)
    checks.check_floating(xp, "x", x)
    return xp


@op(
    differentiable=("x",),
    reference=SIGMOID_REFERENCE,
    residuals=UNARY_RESIDUALS,
    examples=_act_examples,
)
def sigmoid(x: Array) -> Call[Array]:
    r"""Logistic sigmoid ``1 / (1 + exp(-x))``, computed without overflow for either sign.

    Parameters
    ----------
    x : array, any shape

    Returns
    -------
    y : array, shape of x

    Notes
    -----
    Backward from the output: ``dx = dy ⊙ y (1 - y)``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.sigmoid(np.array([-800.0, 0.0, 800.0]))
    array([0. , 0.5, 1. ])
    """
    return Call(_prepare_unary(x), {"x": x}, NoOptions())


@op(
    differentiable=("x",),
    reference=RELU_REFERENCE,
    residuals=UNARY_RESIDUALS,
    examples=_act_examples,
)
def relu(x: Array) -> Call[Array]:
    r"""Rectifier ``max(x, 0)``.

    Parameters
    ----------
    x : array, any shape

    Returns
    -------
    y : array, shape of x

    Notes
    -----
    ``dx = dy ⊙ 1[x > 0]`` (the subgradient at 0 is 0, as in PyTorch).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.relu(np.array([-1.0, 0.5]))
    array([0. , 0.5])
    """
    return Call(_prepare_unary(x), {"x": x}, NoOptions())


@op(
    differentiable=("x",),
    reference=TANH_REFERENCE,
    residuals=UNARY_RESIDUALS,
    examples=_act_examples,
)
def tanh(x: Array) -> Call[Array]:
    r"""Hyperbolic tangent.

    Parameters
    ----------
    x : array, any shape

    Returns
    -------
    y : array, shape of x

    Notes
    -----
    Backward from the output: ``dx = dy ⊙ (1 - y²)``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.tanh(np.array([0.0]))
    array([0.])
    """
    return Call(_prepare_unary(x), {"x": x}, NoOptions())


@op(
    differentiable=("x",),
    reference=ELU_REFERENCE,
    residuals=UNARY_RESIDUALS,
    examples=_act_examples,
)
def elu(x: Array, *, alpha: float = 1.0) -> Call[Array]:
    r"""Exponential linear unit: ``x`` for x > 0, ``alpha (exp(x) - 1)`` otherwise.

    Parameters
    ----------
    x : array, any shape
    alpha : float, default 1.0

    Returns
    -------
    y : array, shape of x

    Notes
    -----
    ``dx = dy`` for x > 0 and ``dy ⊙ alpha exp(x)`` otherwise (PyTorch's convention at 0).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.elu(np.array([-1.0, 2.0])).round(4)
    array([-0.6321,  2.    ])
    """
    return Call(_prepare_unary(x), {"x": x}, EluOptions(alpha=checks.check_real("alpha", alpha)))


# -- pooling --------------------------------------------------------------------------------------


def _pool_args(x, kernel_size, stride, padding, dilation=1):
    kernel = _pair("kernel_size", kernel_size, minimum=1)
    stride = kernel if stride is None else _pair("stride", stride, minimum=1)
    padding = _pair("padding", padding, minimum=0)
    dilation = _pair("dilation", dilation, minimum=1)
    for p, k in zip(padding, kernel, strict=True):
        if p > k // 2:
            raise ValueError(
                f"padding: expected at most half the kernel size {kernel}, got {padding}"
            )
    h, w = x.shape[-2], x.shape[-1]
    ho, wo = conv2d_output_size((h, w), kernel, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"x: spatial size {(h, w)} is too small for kernel_size {kernel} and padding {padding}"
        )
    return kernel, stride, padding, dilation


def _pool_examples(rng):
    x = rng.standard_normal((2, 3, 7, 6))
    return [
        ((x, 2), {}),
        ((x, (3, 2)), {"stride": (2, 1), "padding": 1}),
    ]


def _maxpool_examples(rng):
    return _pool_examples(rng) + [
        ((rng.standard_normal((2, 7, 7)), 2), {"stride": 1, "dilation": 2})
    ]


@op(
    differentiable=("x",),
    reference=MAX_POOL_REFERENCE,
    residuals=MAX_POOL_RESIDUALS,
    examples=_maxpool_examples,
)
def max_pool2d(
    x: Array,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    *,
    dilation: int | tuple[int, int] = 1,
) -> Call[Array]:
    r"""2-D max pooling as ``torch.nn.functional.max_pool2d`` (floor mode).

    Parameters
    ----------
    x : array, shape (..., H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int), default 0
        Implicit ``-inf`` padding, at most half the kernel.
    dilation : int or (int, int), default 1

    Returns
    -------
    y : array, shape (..., Ho, Wo)

    Notes
    -----
    Shape legend: ``...`` leading dims (usually N, C). The gradient goes to the first maximum of
    each window in row-major order (PyTorch's CPU rule); avoid ties when checking gradients.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.max_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    k, s, p, d = _pool_args(x, kernel_size, stride, padding, dilation)
    return Call(xp, {"x": x}, MaxPoolOptions(kernel_size=k, stride=s, padding=p, dilation=d))


def _avgpool_examples(rng):
    x = rng.standard_normal((2, 3, 7, 6))
    return _pool_examples(rng) + [((x, 3), {"stride": 2, "padding": 1, "count_include_pad": False})]


@op(
    differentiable=("x",),
    reference=AVG_POOL_REFERENCE,
    residuals=AVG_POOL_RESIDUALS,
    examples=_avgpool_examples,
)
def avg_pool2d(
    x: Array,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    *,
    count_include_pad: bool = True,
) -> Call[Array]:
    r"""2-D average pooling as ``torch.nn.functional.avg_pool2d`` (floor mode).

    Parameters
    ----------
    x : array, shape (..., H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int), default 0
        Zero padding, at most half the kernel.
    count_include_pad : bool, default True
        Divide by ``kh·kw`` (True) or by the number of non-padding elements of the window.

    Returns
    -------
    y : array, shape (..., Ho, Wo)

    Notes
    -----
    Shape legend: ``...`` leading dims. Backward spreads ``dy / divisor`` over each window.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.avg_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)
    array([[[[ 2.5,  4.5],
             [10.5, 12.5]]]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    if not isinstance(count_include_pad, bool):
        raise TypeError(
            f"count_include_pad: expected a bool, got {type(count_include_pad).__name__}"
        )
    k, s, p, _ = _pool_args(x, kernel_size, stride, padding)
    return Call(
        xp,
        {"x": x},
        AvgPoolOptions(kernel_size=k, stride=s, padding=p, count_include_pad=count_include_pad),
    )


def _output_size(x, output_size):
    return _pair("output_size", output_size, minimum=1)


def _adaptive_examples(rng):
    x = rng.standard_normal((2, 3, 7, 9))
    return [((x, 1), {}), ((x, (3, 4)), {}), ((x, 4), {})]


@op(
    differentiable=("x",),
    reference=ADAPTIVE_AVG_REFERENCE,
    residuals=ADAPTIVE_AVG_RESIDUALS,
    examples=_adaptive_examples,
)
def adaptive_avg_pool2d(x: Array, output_size: int | tuple[int, int]) -> Call[Array]:
    r"""Adaptive average pooling as ``torch.nn.functional.adaptive_avg_pool2d``.

    Output cell ``(i, j)`` averages rows ``[floor(i·H/oh), ceil((i+1)·H/oh))`` and the columns
    likewise (PyTorch's bin rule: bins overlap when the size is not divisible).
    ``output_size = 1`` is global average pooling.

    Parameters
    ----------
    x : array, shape (..., H, W)
    output_size : int or (int, int)

    Returns
    -------
    y : array, shape (..., oh, ow)

    Notes
    -----
    Shape legend: ``...`` leading dims, ``oh, ow`` the output size. Written as ``y = A_h x A_wᵀ``
    with bin-averaging matrices, so backward is ``dx = A_hᵀ dy A_w``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.adaptive_avg_pool2d(np.arange(6.0).reshape(1, 1, 1, 6), (1, 4))
    array([[[[0.5, 1.5, 3.5, 4.5]]]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    size = _output_size(x, output_size)
    return Call(xp, {"x": x}, AdaptivePoolOptions(output_size=size, shape=tuple(x.shape)))


@op(
    differentiable=("x",),
    reference=ADAPTIVE_MAX_REFERENCE,
    residuals=ADAPTIVE_MAX_RESIDUALS,
    examples=_adaptive_examples,
)
def adaptive_max_pool2d(x: Array, output_size: int | tuple[int, int]) -> Call[Array]:
    r"""Adaptive max pooling as ``torch.nn.functional.adaptive_max_pool2d`` (PyTorch's bin rule).

    Parameters
    ----------
    x : array, shape (..., H, W)
    output_size : int or (int, int)
        ``1`` is global max pooling.

    Returns
    -------
    y : array, shape (..., oh, ow)

    Notes
    -----
    Shape legend: ``...`` leading dims. The gradient goes to the first maximum of each bin
    (row-major), summed where bins overlap.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.adaptive_max_pool2d(np.arange(6.0).reshape(1, 1, 2, 3), 1)
    array([[[[5.]]]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    size = _output_size(x, output_size)
    return Call(xp, {"x": x}, AdaptivePoolOptions(output_size=size, shape=tuple(x.shape)))


# -- upsampling -----------------------------------------------------------------------------------


def _resize_args(x, size, scale_factor):
    h, w = x.shape[-2], x.shape[-1]
    if (size is None) == (scale_factor is None):
        raise ValueError(
            f"size, scale_factor: expected exactly one of them, got size={size!r}, "
            f"scale_factor={scale_factor!r}"
        )
    if size is not None:
        return _pair("size", size, minimum=1), None
    sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    if len(sf) != 2:
        raise ValueError(f"scale_factor: expected a number or a pair, got {scale_factor!r}")
    sf = tuple(checks.check_real("scale_factor", s) for s in sf)
    if min(sf) <= 0:
        raise ValueError(f"scale_factor: expected positive numbers, got {scale_factor!r}")
    out = (int(math.floor(h * sf[0])), int(math.floor(w * sf[1])))
    if min(out) < 1:
        raise ValueError(f"scale_factor: gives an empty output {out} for input size {(h, w)}")
    return out, sf


def _resize_examples(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    return [((x, (8, 10)), {}), ((x, (7, 3)), {}), ((x,), {"scale_factor": 2})]


@op(
    differentiable=("x",),
    reference=NEAREST_REFERENCE,
    residuals=RESIZE_RESIDUALS,
    examples=_resize_examples,
)
def upsample_nearest2d(
    x: Array,
    size: int | tuple[int, int] | None = None,
    *,
    scale_factor: float | tuple[float, float] | None = None,
) -> Call[Array]:
    r"""Nearest-neighbour resize as ``F.interpolate(x, size, scale_factor, mode='nearest')``.

    Output row ``i`` copies input row ``min(floor(i·scale), H - 1)`` with ``scale = H/Ho`` (or
    ``1/scale_factor`` when given, as PyTorch does); columns likewise.

    Parameters
    ----------
    x : array, shape (..., H, W)
    size : int or (int, int), optional
        Output size (Ho, Wo).
    scale_factor : float or (float, float), optional
        Instead of ``size``: ``Ho = floor(H·scale_factor)``.

    Returns
    -------
    y : array, shape (..., Ho, Wo)

    Notes
    -----
    Shape legend: ``...`` leading dims. Backward: each input pixel receives the sum of the
    gradients of the output pixels copied from it (for an integer factor s, the sum over its
    s×s cell).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.upsample_nearest2d(np.array([[1.0, 2.0]]), scale_factor=2)
    array([[1., 1., 2., 2.],
           [1., 1., 2., 2.]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    out, sf = _resize_args(x, size, scale_factor)
    return Call(xp, {"x": x}, NearestOptions(size=out, scale_factor=sf, shape=tuple(x.shape)))


def _bil_examples(rng):
    return _resize_examples(rng) + [
        ((rng.standard_normal((2, 3, 4, 5)), (7, 9)), {"align_corners": True})
    ]


@op(
    differentiable=("x",),
    reference=BILINEAR_REFERENCE,
    residuals=RESIZE_RESIDUALS,
    examples=_bil_examples,
)
def upsample_bilinear2d(
    x: Array,
    size: int | tuple[int, int] | None = None,
    *,
    scale_factor: float | tuple[float, float] | None = None,
    align_corners: bool = False,
) -> Call[Array]:
    r"""Bilinear resize as ``F.interpolate(x, size, scale_factor, mode='bilinear', align_corners)``.

    With ``align_corners=False`` the source coordinate of output row ``i`` is
    ``max((i + 0.5)·scale - 0.5, 0)``; with ``True`` it is ``i·(H - 1)/(Ho - 1)``.

    Parameters
    ----------
    x : array, shape (..., H, W)
    size : int or (int, int), optional
    scale_factor : float or (float, float), optional
        Instead of ``size``.
    align_corners : bool, default False

    Returns
    -------
    y : array, shape (..., Ho, Wo)

    Notes
    -----
    Shape legend: ``...`` leading dims. Written as ``y = B_h x B_wᵀ`` with interpolation matrices
    (two non-zeros per row), so backward is ``dx = B_hᵀ dy B_w``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> aa.upsample_bilinear2d(np.array([[0.0, 1.0]]), (1, 3), align_corners=True)
    array([[0. , 0.5, 1. ]])
    """
    xp = _floating(x=x)
    _image("x", x, exact=False)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected a bool, got {type(align_corners).__name__}")
    out, sf = _resize_args(x, size, scale_factor)
    return Call(
        xp,
        {"x": x},
        BilinearOptions(
            size=out, scale_factor=sf, align_corners=align_corners, shape=tuple(x.shape)
        ),
    )

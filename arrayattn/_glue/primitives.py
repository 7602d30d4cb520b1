"""Glue of the primitives: options, residual schemas and reference kernels."""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference import primitives as ref
from .._reference.primitives import conv2d_output_size

__all__ = [
    "conv2d_output_size",
    "ADAPTIVE_AVG_REFERENCE",
    "ADAPTIVE_AVG_RESIDUALS",
    "ADAPTIVE_MAX_REFERENCE",
    "ADAPTIVE_MAX_RESIDUALS",
    "AVG_POOL_REFERENCE",
    "AVG_POOL_RESIDUALS",
    "BILINEAR_REFERENCE",
    "CONV2D_REFERENCE",
    "CONV2D_RESIDUALS",
    "ELU_REFERENCE",
    "LAYER_NORM_REFERENCE",
    "LAYER_NORM_RESIDUALS",
    "LINEAR_REFERENCE",
    "LINEAR_RESIDUALS",
    "MAX_POOL_REFERENCE",
    "MAX_POOL_RESIDUALS",
    "NEAREST_REFERENCE",
    "RELU_REFERENCE",
    "RESIZE_RESIDUALS",
    "SIGMOID_REFERENCE",
    "TANH_REFERENCE",
    "UNARY_RESIDUALS",
    "AdaptivePoolOptions",
    "AvgPoolOptions",
    "BilinearOptions",
    "Conv2dOptions",
    "EluOptions",
    "LayerNormOptions",
    "LinearOptions",
    "MaxPoolOptions",
    "NearestOptions",
]

Pair = tuple[int, int]


@dataclass(frozen=True)
class Conv2dOptions(Options):
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    has_bias: bool


@dataclass(frozen=True)
class LinearOptions(Options):
    has_bias: bool


@dataclass(frozen=True)
class LayerNormOptions(Options):
    eps: float
    has_bias: bool


@dataclass(frozen=True)
class EluOptions(Options):
    alpha: float


@dataclass(frozen=True)
class MaxPoolOptions(Options):
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair


@dataclass(frozen=True)
class AvgPoolOptions(Options):
    kernel_size: Pair
    stride: Pair
    padding: Pair
    count_include_pad: bool


@dataclass(frozen=True)
class AdaptivePoolOptions(Options):
    output_size: Pair
    shape: tuple[int, ...]  # the input's shape (backward scatters into it)


@dataclass(frozen=True)
class NearestOptions(Options):
    size: Pair
    scale_factor: tuple[float, float] | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BilinearOptions(Options):
    size: Pair
    scale_factor: tuple[float, float] | None
    align_corners: bool
    shape: tuple[int, ...]


CONV2D_RESIDUALS = ("x", "weight")
LINEAR_RESIDUALS = ("x", "weight")
LAYER_NORM_RESIDUALS = ("x", "weight", "mean", "rstd")
UNARY_RESIDUALS = ("t",)
MAX_POOL_RESIDUALS = ("x", "y")
AVG_POOL_RESIDUALS = ("x",)
ADAPTIVE_AVG_RESIDUALS = ("dummy",)
ADAPTIVE_MAX_RESIDUALS = ("y", "index")
RESIZE_RESIDUALS = ("y",)


def _conv_fwd(xp, arrays, options, save):
    y = ref.conv2d_forward(
        xp,
        arrays["x"],
        arrays["weight"],
        arrays["bias"],
        stride=options.stride,
        padding=options.padding,
        dilation=options.dilation,
        groups=options.groups,
    )
    return (y,), ({"x": arrays["x"], "weight": arrays["weight"]} if save else {})


def _conv_bwd(xp, saved, options, cts):
    dx, dw, db = ref.conv2d_backward(
        xp,
        saved["x"],
        saved["weight"],
        cts[0],
        stride=options.stride,
        padding=options.padding,
        dilation=options.dilation,
        groups=options.groups,
        with_bias=options.has_bias,
    )
    return {"x": dx, "weight": dw, "bias": db}


def _linear_fwd(xp, arrays, options, save):
    y = ref.linear_forward(xp, arrays["x"], arrays["weight"], arrays["bias"])
    return (y,), ({"x": arrays["x"], "weight": arrays["weight"]} if save else {})


def _linear_bwd(xp, saved, options, cts):
    dx, dw, db = ref.linear_backward(xp, saved["x"], saved["weight"], cts[0], options.has_bias)
    return {"x": dx, "weight": dw, "bias": db}


def _ln_fwd(xp, arrays, options, save):
    y, mean, rstd = ref.layer_norm_forward(
        xp, arrays["x"], arrays["weight"], arrays["bias"], options.eps
    )
    saved = (
        {"x": arrays["x"], "weight": arrays["weight"], "mean": mean, "rstd": rstd} if save else {}
    )
    return (y,), saved


def _ln_bwd(xp, saved, options, cts):
    dx, dw, db = ref.layer_norm_backward(
        xp, saved["x"], saved["weight"], saved["mean"], saved["rstd"], cts[0], options.has_bias
    )
    return {"x": dx, "weight": dw, "bias": db}


def _unary(name: str, save_output: bool, **kw):
    fwd_fn = getattr(ref, f"{name}_forward")
    bwd_fn = getattr(ref, f"{name}_backward")

    def fwd(xp, arrays, options, save):
        y = fwd_fn(xp, arrays["x"], **{k: getattr(options, k) for k in kw})
        return (y,), ({"t": y if save_output else arrays["x"]} if save else {})

    def bwd(xp, saved, options, cts):
        return {"x": bwd_fn(xp, saved["t"], cts[0], **{k: getattr(options, k) for k in kw})}

    return Kernel(fwd, bwd, dtypes=None)


def _maxpool_fwd(xp, arrays, options, save):
    y = ref.max_pool2d_forward(
        xp,
        arrays["x"],
        options.kernel_size,
        options.stride,
        options.padding,
        options.dilation,
    )
    return (y,), ({"x": arrays["x"], "y": y} if save else {})


def _maxpool_bwd(xp, saved, options, cts):
    dx = ref.max_pool2d_backward(
        xp,
        saved["x"],
        saved["y"],
        cts[0],
        options.kernel_size,
        options.stride,
        options.padding,
        options.dilation,
    )
    return {"x": dx}


def _avgpool_fwd(xp, arrays, options, save):
    y = ref.avg_pool2d_forward(
        xp,
        arrays["x"],
        options.kernel_size,
        options.stride,
        options.padding,
        options.count_include_pad,
    )
    return (y,), ({"x": arrays["x"]} if save else {})


def _avgpool_bwd(xp, saved, options, cts):
    dx = ref.avg_pool2d_backward(
        xp,
        saved["x"],
        cts[0],
        options.kernel_size,
        options.stride,
        options.padding,
        options.count_include_pad,
    )
    return {"x": dx}


def _aavg_fwd(xp, arrays, options, save):
    y = ref.adaptive_avg_pool2d_forward(xp, arrays["x"], options.output_size)
    return (y,), ({"dummy": y[..., :0, :0]} if save else {})


def _aavg_bwd(xp, saved, options, cts):
    return {"x": ref.adaptive_avg_pool2d_backward(xp, options.shape, cts[0])}


def _amax_fwd(xp, arrays, options, save):
    y, index = ref.adaptive_max_pool2d_forward(xp, arrays["x"], options.output_size)
    return (y,), ({"index": index, "y": y[..., :0, :0]} if save else {})


def _amax_bwd(xp, saved, options, cts):
    return {"x": ref.adaptive_max_pool2d_backward(xp, options.shape, saved["index"], cts[0])}


def _near_fwd(xp, arrays, options, save):
    y = ref.upsample_nearest2d_forward(xp, arrays["x"], options.size, options.scale_factor)
    return (y,), ({"y": y[..., :0, :0]} if save else {})


def _near_bwd(xp, saved, options, cts):
    return {"x": ref.upsample_nearest2d_backward(xp, options.shape, cts[0], options.scale_factor)}


def _bil_fwd(xp, arrays, options, save):
    y = ref.upsample_bilinear2d_forward(
        xp, arrays["x"], options.size, options.align_corners, options.scale_factor
    )
    return (y,), ({"y": y[..., :0, :0]} if save else {})


def _bil_bwd(xp, saved, options, cts):
    dx = ref.upsample_bilinear2d_backward(
        xp, options.shape, cts[0], options.align_corners, options.scale_factor
    )
    return {"x": dx}


CONV2D_REFERENCE = Kernel(_conv_fwd, _conv_bwd, dtypes=None)
LINEAR_REFERENCE = Kernel(_linear_fwd, _linear_bwd, dtypes=None)
LAYER_NORM_REFERENCE = Kernel(_ln_fwd, _ln_bwd, dtypes=None)
SIGMOID_REFERENCE = _unary("sigmoid", True)
RELU_REFERENCE = _unary("relu", False)
TANH_REFERENCE = _unary("tanh", True)
ELU_REFERENCE = _unary("elu", False, alpha=None)
MAX_POOL_REFERENCE = Kernel(_maxpool_fwd, _maxpool_bwd, dtypes=None)
AVG_POOL_REFERENCE = Kernel(_avgpool_fwd, _avgpool_bwd, dtypes=None)
ADAPTIVE_AVG_REFERENCE = Kernel(_aavg_fwd, _aavg_bwd, dtypes=None)
ADAPTIVE_MAX_REFERENCE = Kernel(_amax_fwd, _amax_bwd, dtypes=None)
NEAREST_REFERENCE = Kernel(_near_fwd, _near_bwd, dtypes=None)
BILINEAR_REFERENCE = Kernel(_bil_fwd, _bil_bwd, dtypes=None)

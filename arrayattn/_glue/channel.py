"""Glue of the channel-attention family: options, residual schemas and reference kernels.

Every op here saves ``x``, each parameter ``params[key]`` as ``p_<key>`` and the reference's
intermediates; the numba kernels of SE and CBAM save the same record.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference import channel as ref

__all__ = [
    "AC_REFERENCE",
    "AC_RESIDUALS",
    "CBAM_REFERENCE",
    "CBAM_RESIDUALS",
    "SE_REFERENCE",
    "SE_RESIDUALS",
    "SPA_REFERENCE",
    "SPA_RESIDUALS",
    "CbamOptions",
    "CondenserOptions",
    "SpaOptions",
]


@dataclass(frozen=True)
class CbamOptions(Options):
    pool_order: str  # "avg_max" or "max_avg"


@dataclass(frozen=True)
class SpaOptions(Options):
    levels: tuple[int, ...]


@dataclass(frozen=True)
class CondenserOptions(Options):
    pool_size: int
    selective: str


SE_RESIDUALS = ("x", "p_*", "z", "h", "s")
CBAM_RESIDUALS = (
    "x", "p_*", "avg", "mx", "arg_hw", "h_avg", "h_max", "mc", "pooled", "arg_c", "ms",
)  # fmt: skip
SPA_RESIDUALS = ("x", "p_*", "z", "h", "s")
AC_RESIDUALS = ("x", "p_*", "q", "e1", "e2", "g?")  # g: the selective modes that gate


def _se_fwd(xp, arrays, options, save):
    y, saved = ref.se_forward(xp, arrays["x"], arrays["params"])
    return (y,), (
        {"x": arrays["x"], **{f"p_{k}": v for k, v in arrays["params"].items()}, **saved}
        if save
        else {}
    )


def _params_back(saved):
    return {k[2:]: v for k, v in saved.items() if k.startswith("p_")}


def _se_bwd(xp, saved, options, cts):
    dx, dp = ref.se_backward(xp, saved["x"], _params_back(saved), saved, cts[0])
    return {"x": dx, "params": dp}


def _cbam_fwd(xp, arrays, options, save):
    y, saved = ref.cbam_forward(xp, arrays["x"], arrays["params"], pool_order=options.pool_order)
    return (y,), (
        {"x": arrays["x"], **{f"p_{k}": v for k, v in arrays["params"].items()}, **saved}
        if save
        else {}
    )


def _cbam_bwd(xp, saved, options, cts):
    dx, dp = ref.cbam_backward(
        xp, saved["x"], _params_back(saved), saved, cts[0], pool_order=options.pool_order
    )
    return {"x": dx, "params": dp}


def _spa_fwd(xp, arrays, options, save):
    y, saved = ref.spa_forward(xp, arrays["x"], arrays["params"], levels=options.levels)
    return (y,), (
        {"x": arrays["x"], **{f"p_{k}": v for k, v in arrays["params"].items()}, **saved}
        if save
        else {}
    )


def _spa_bwd(xp, saved, options, cts):
    dx, dp = ref.spa_backward(
        xp, saved["x"], _params_back(saved), saved, cts[0], levels=options.levels
    )
    return {"x": dx, "params": dp}


def _ac_fwd(xp, arrays, options, save):
    y, saved = ref.condenser_forward(
        xp,
        arrays["x"],
        arrays["params"],
        pool_size=options.pool_size,
        selective=options.selective,
    )
    return (y,), (
        {"x": arrays["x"], **{f"p_{k}": v for k, v in arrays["params"].items()}, **saved}
        if save
        else {}
    )


def _ac_bwd(xp, saved, options, cts):
    dx, dp = ref.condenser_backward(
        xp,
        saved["x"],
        _params_back(saved),
        saved,
        cts[0],
        pool_size=options.pool_size,
        selective=options.selective,
    )
    return {"x": dx, "params": dp}


SE_REFERENCE = Kernel(_se_fwd, _se_bwd, dtypes=None)
CBAM_REFERENCE = Kernel(_cbam_fwd, _cbam_bwd, dtypes=None)
SPA_REFERENCE = Kernel(_spa_fwd, _spa_bwd, dtypes=None)
AC_REFERENCE = Kernel(_ac_fwd, _ac_bwd, dtypes=None)

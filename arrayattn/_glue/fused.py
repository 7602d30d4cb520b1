"""Glue of fused attention pooling: options, residual schema and reference kernel."""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.fused import fused_backward, fused_forward

__all__ = ["FUSED_REFERENCE", "FUSED_RESIDUALS", "FusedOptions"]


@dataclass(frozen=True)
class FusedOptions(Options):
    scale: float
    fuse: str
    return_weights: bool
    with_bias: bool


FUSED_RESIDUALS = ("q", "k", "v", "mask", "lse", "pooled", "w_o")


def _ref_fwd(xp, arrays, options, save):
    params = arrays["params"] or {}
    y, alpha, pooled, lse = fused_forward(
        xp,
        arrays["q"],
        arrays["k"],
        arrays["v"],
        mask=arrays["mask"],
        scale=options.scale,
        fuse=options.fuse,
        w_o=params.get("w_o"),
        b_o=params.get("b_o"),
    )
    outs = (y, alpha) if options.return_weights else (y,)
    saved = {}
    if save:
        saved = {
            "q": arrays["q"],
            "k": arrays["k"],
            "v": arrays["v"],
            "mask": arrays["mask"],
            "lse": lse,
            "pooled": pooled if "w_o" in params else None,
            "w_o": params.get("w_o"),
        }
    return outs, saved


def _ref_bwd(xp, saved, options, cotangents):
    dalpha = cotangents[1] if options.return_weights else None
    dq, dk, dv, dw_o, db_o = fused_backward(
        xp,
        saved["q"],
        saved["k"],
        saved["v"],
        saved["lse"],
        cotangents[0],
        dalpha,
        mask=saved["mask"],
        scale=options.scale,
        fuse=options.fuse,
        pooled=saved["pooled"],
        w_o=saved["w_o"],
        with_bias=options.with_bias,
    )
    grads = {"q": dq, "k": dk, "v": dv}
    if saved["w_o"] is not None:
        grads["params"] = {"w_o": dw_o, **({"b_o": db_o} if options.with_bias else {})}
    return grads


FUSED_REFERENCE = Kernel(_ref_fwd, _ref_bwd, dtypes=None)

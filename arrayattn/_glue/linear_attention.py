"""Glue of efficient and linear attention: options, residual schemas and reference kernels."""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.linear_attention import (
    efficient_backward,
    efficient_forward,
    linear_backward,
    linear_forward,
)

__all__ = [
    "EFFICIENT_REFERENCE",
    "EFFICIENT_RESIDUALS",
    "LINEAR_REFERENCE",
    "LINEAR_RESIDUALS",
    "LinearAttentionOptions",
]


@dataclass(frozen=True)
class LinearAttentionOptions(Options):
    causal: bool
    eps: float


EFFICIENT_RESIDUALS = ("qs", "ks", "v", "g", "out")
LINEAR_RESIDUALS = ("q", "k", "v", "out", "den")


def _eff_ref_fwd(xp, arrays, options, save):
    out, qs, ks, g = efficient_forward(xp, arrays["q"], arrays["k"], arrays["v"])
    saved = {"qs": qs, "ks": ks, "g": g, "v": arrays["v"], "out": out} if save else {}
    return (out,), saved


def _eff_ref_bwd(xp, saved, options, cotangents):
    dq, dk, dv = efficient_backward(
        xp, saved["qs"], saved["ks"], saved["g"], saved["v"], cotangents[0], saved["out"].dtype
    )
    return {"q": dq, "k": dk, "v": dv}


def _lin_ref_fwd(xp, arrays, options, save):
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    out, den = linear_forward(xp, q, k, v, causal=options.causal, eps=options.eps)
    saved = {"q": q, "k": k, "v": v, "out": out, "den": den} if save else {}
    return (out,), saved


def _lin_ref_bwd(xp, saved, options, cotangents):
    dq, dk, dv = linear_backward(
        xp,
        saved["q"],
        saved["k"],
        saved["v"],
        saved["out"],
        saved["den"],
        cotangents[0],
        causal=options.causal,
    )
    return {"q": dq, "k": dk, "v": dv}


EFFICIENT_REFERENCE = Kernel(_eff_ref_fwd, _eff_ref_bwd, dtypes=None)
LINEAR_REFERENCE = Kernel(_lin_ref_fwd, _lin_ref_bwd, dtypes=None)

"""Glue of hard attention, Gumbel-softmax and hard-concrete gates."""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.hard import (
    gumbel_backward,
    gumbel_forward,
    hard_attention_backward,
    hard_attention_forward,
    hard_concrete_backward,
    hard_concrete_forward,
)

__all__ = [
    "CONCRETE_REFERENCE",
    "CONCRETE_RESIDUALS",
    "ConcreteOptions",
    "GUMBEL_REFERENCE",
    "GUMBEL_RESIDUALS",
    "GumbelOptions",
    "HARD_REFERENCE",
    "HARD_RESIDUALS",
]


@dataclass(frozen=True)
class GumbelOptions(Options):
    tau: float
    hard: bool
    axis: int
    eps: float


@dataclass(frozen=True)
class ConcreteOptions(Options):
    beta: float
    gamma: float
    zeta: float
    eps: float
    training: bool
    hard: bool


HARD_RESIDUALS = ("sample", "log_alpha", "entropy", "e")
GUMBEL_RESIDUALS = ("y_soft", "logits")
CONCRETE_RESIDUALS = ("log_alpha", "s", "s_bar")


def _ha_fwd(xp, arrays, options, save):
    glimpse, sample, log_prob, entropy, log_alpha = hard_attention_forward(
        xp, arrays["a"], arrays["e"], arrays["uniforms"], arrays["mask"]
    )
    saved = {}
    if save:
        saved = {"sample": sample, "log_alpha": log_alpha, "entropy": entropy, "e": arrays["e"]}
    return (glimpse, sample, log_prob, entropy), saved


def _ha_bwd(xp, saved, options, cotangents):
    dglimpse, _, dlog_prob, dentropy = cotangents
    da, de = hard_attention_backward(
        xp,
        saved["sample"],
        saved["log_alpha"],
        saved["entropy"],
        dglimpse,
        dlog_prob,
        dentropy,
        saved["sample"].dtype,
        saved["e"].dtype,
    )
    return {"a": da, "e": de}


def _gs_fwd(xp, arrays, options, save):
    y, y_soft = gumbel_forward(
        xp,
        arrays["logits"],
        arrays["uniforms"],
        tau=options.tau,
        hard=options.hard,
        axis=options.axis,
        eps=options.eps,
    )
    return (y,), ({"y_soft": y_soft, "logits": arrays["logits"]} if save else {})


def _gs_bwd(xp, saved, options, cotangents):
    dl = gumbel_backward(
        xp,
        saved["y_soft"],
        cotangents[0],
        tau=options.tau,
        axis=options.axis,
        dtype=saved["logits"].dtype,
    )
    return {"logits": dl}


def _hc_fwd(xp, arrays, options, save):
    opts = {k: getattr(options, k) for k in ("beta", "gamma", "zeta", "training")}
    gate, l0, s, s_bar = hard_concrete_forward(
        xp, arrays["log_alpha"], arrays["uniforms"], eps=options.eps, hard=options.hard, **opts
    )
    saved = {"log_alpha": arrays["log_alpha"], "s": s, "s_bar": s_bar} if save else {}
    return (gate, l0), saved


def _hc_bwd(xp, saved, options, cotangents):
    dgate, dl0 = cotangents
    opts = {k: getattr(options, k) for k in ("beta", "gamma", "zeta", "training")}
    dla = hard_concrete_backward(
        xp, saved["log_alpha"], saved["s"], saved["s_bar"], dgate, dl0, **opts
    )
    return {"log_alpha": dla}


HARD_REFERENCE = Kernel(_ha_fwd, _ha_bwd, dtypes=None)
GUMBEL_REFERENCE = Kernel(_gs_fwd, _gs_bwd, dtypes=None)
CONCRETE_REFERENCE = Kernel(_hc_fwd, _hc_bwd, dtypes=None)

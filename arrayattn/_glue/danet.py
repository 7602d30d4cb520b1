"""Glue of the DANet family: options, residual schemas, reference kernels, example inputs.

Both modules are composite: their references run 1×1 convolutions and reshapes in array-API code
and the attention itself through the ``scaled_dot_product_attention`` op, on whichever backend
the setting picks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._kernel import Kernel, Options
from .._reference import danet as ref

__all__ = [
    "CAM_REFERENCE",
    "CAM_RESIDUALS",
    "PAM_REFERENCE",
    "PAM_RESIDUALS",
    "CamOptions",
    "example_pam_params",
]


@dataclass(frozen=True)
class CamOptions(Options):
    logits: str  # "paper" or "code"


PAM_RESIDUALS = ("x", "p_*", "attn")
CAM_RESIDUALS = ("gamma", "attn")


def _pam_fwd(xp, arrays, options, save, *, ops):
    y, saved = ref.pam_forward(
        xp, arrays["x"], arrays["params"], save, sdpa=ops.scaled_dot_product_attention
    )
    return (y,), saved


def _pam_bwd(xp, saved, options, cts, *, ops):
    dx, dp = ref.pam_backward(xp, saved, cts[0], sdpa=ops.scaled_dot_product_attention)
    return {"x": dx, "params": dp}


def _cam_fwd(xp, arrays, options, save, *, ops):
    y, saved = ref.cam_forward(
        xp, arrays["x"], arrays["gamma"], options.logits, save,
        sdpa=ops.scaled_dot_product_attention,
    )  # fmt: skip
    return (y,), saved


def _cam_bwd(xp, saved, options, cts, *, ops):
    dx, dgamma = ref.cam_backward(
        xp, saved, options.logits, cts[0], sdpa=ops.scaled_dot_product_attention
    )
    return {"x": dx, "gamma": dgamma}


_USES = ("scaled_dot_product_attention",)
PAM_REFERENCE = Kernel(_pam_fwd, _pam_bwd, dtypes=None, uses=_USES)
CAM_REFERENCE = Kernel(_cam_fwd, _cam_bwd, dtypes=None, uses=_USES)


def example_pam_params(rng, c, cq, bias=True, gamma=0.7) -> dict[str, Any]:
    """Random float64 PAM parameters (also used by tests and benchmarks)."""
    p = {
        "w_query": rng.standard_normal((cq, c, 1, 1)) / c**0.5,
        "w_key": rng.standard_normal((cq, c, 1, 1)) / c**0.5,
        "w_value": rng.standard_normal((c, c, 1, 1)) / c**0.5,
        "gamma": gamma + 0.0 * rng.standard_normal(1),
    }
    if bias:
        p.update(
            b_query=0.1 * rng.standard_normal(cq),
            b_value=0.1 * rng.standard_normal(c),
        )
    return p

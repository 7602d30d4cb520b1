"""Glue of the non-local block: options, residual schema, reference kernel, example inputs.

The block is composite: its softmax modes run the attention through the
``scaled_dot_product_attention`` op, on whichever backend the setting picks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._kernel import Kernel, Options
from .._reference import non_local as ref

__all__ = ["NON_LOCAL_REFERENCE", "NON_LOCAL_RESIDUALS", "NonLocalOptions", "example_params"]


@dataclass(frozen=True)
class NonLocalOptions(Options):
    mode: str
    subsample: bool
    scale: float


NON_LOCAL_RESIDUALS = (
    "x", "p_*", "y", "theta?", "phi?", "g?", "phi_full?", "g_full?", "attn?", "m?", "pre?",
)  # fmt: skip


def _fwd(xp, arrays, options, save, *, ops):
    z, saved = ref.nl_forward(
        xp,
        arrays["x"],
        arrays["params"],
        mode=options.mode,
        subsample=options.subsample,
        scale=options.scale,
        save=save,
        sdpa=ops.scaled_dot_product_attention,
    )
    return (z,), saved


def _bwd(xp, saved, options, cts, *, ops):
    dx, dp = ref.nl_backward(
        xp,
        saved,
        mode=options.mode,
        subsample=options.subsample,
        dz=cts[0],
        sdpa=ops.scaled_dot_product_attention,
    )
    return {"x": dx, "params": dp}


def example_params(rng, c, ci, mode, bias=True) -> dict[str, Any]:
    """Random float64 parameters of a non-local block (also used by tests and benchmarks)."""
    p = {
        "w_g": rng.standard_normal((ci, c, 1, 1)) / c**0.5,
        "w_z": rng.standard_normal((c, ci, 1, 1)) / ci**0.5,
    }
    if mode != "gaussian":
        p["w_theta"] = rng.standard_normal((ci, c, 1, 1)) / c**0.5
        p["w_phi"] = rng.standard_normal((ci, c, 1, 1)) / c**0.5
    if mode == "concat":
        p["w_f"] = rng.standard_normal((1, 2 * ci, 1, 1)) / ci**0.5
    if bias:
        for key in [k for k in p if k != "w_f"]:
            p["b" + key[1:]] = 0.1 * rng.standard_normal(p[key].shape[0])
    return p


NON_LOCAL_REFERENCE = Kernel(_fwd, _bwd, dtypes=None, uses=("scaled_dot_product_attention",))

"""Glue of the co-attention family: options, residual schemas, reference kernels, example inputs.

COSNet's co-attention is composite: beyond 2**22 position pairs per item its reference runs the
two attention maps through the ``scaled_dot_product_attention`` op (linear memory), on whichever
backend the setting picks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._kernel import Kernel, Options
from .._reference import co_attention as ref

__all__ = [
    "CAN_REFERENCE",
    "CAN_RESIDUALS",
    "COATTN_REFERENCE",
    "COATTN_RESIDUALS",
    "CODA_REFERENCE",
    "CODA_RESIDUALS",
    "CanOptions",
    "CoattnOptions",
    "CodaOptions",
    "example_can_params",
    "example_coattn_params",
    "example_coda_params",
]


@dataclass(frozen=True)
class CoattnOptions(Options):
    second_softmax: str  # "paper" or "code"


@dataclass(frozen=True)
class CodaOptions(Options):
    centering: bool


@dataclass(frozen=True)
class CanOptions(Options):
    tau: float


# The dense path (up to 2**22 pairs) saves both softmaxes, the attention-core path the two nested
# SDPA records.
COATTN_RESIDUALS = (
    "a", "b", "za", "zb", "gate_a", "gate_b", "wa", "p_*", "pr?", "bmat?", "attn_a?", "attn_b?",
)  # fmt: skip
CODA_RESIDUALS = ("a", "b", "p_*", "fa", "fb", "ga", "gb", "dist", "sim", "sg", "t")
CAN_RESIDUALS = ("p", "q", "p_*")


def _coattn_fwd(xp, arrays, options, save, *, ops):
    return ref.coattn_forward(
        xp, arrays["v_a"], arrays["v_b"], arrays["params"], options.second_softmax, save,
        sdpa=ops.scaled_dot_product_attention,
    )  # fmt: skip


def _coattn_bwd(xp, saved, options, cts, *, ops):
    da, db, dp = ref.coattn_backward(
        xp, saved, options.second_softmax, cts[0], cts[1], sdpa=ops.scaled_dot_product_attention
    )
    return {"v_a": da, "v_b": db, "params": dp}


COATTN_REFERENCE = Kernel(
    _coattn_fwd, _coattn_bwd, dtypes=None, uses=("scaled_dot_product_attention",)
)


def example_coattn_params(rng, c, bias=False) -> dict[str, Any]:
    p = {
        "w": rng.standard_normal((c, c)) / c**0.5,
        "w_gate": rng.standard_normal((1, c, 1, 1)) / c**0.5,
    }
    if bias:
        p["b_gate"] = 0.3 * rng.standard_normal(1)
    return p


def _coda_fwd(xp, arrays, options, save):
    return ref.coda_forward(xp, arrays["a"], arrays["b"], arrays["params"], options.centering, save)


def _coda_bwd(xp, saved, options, cts):
    da, db, dp = ref.coda_backward(xp, saved, options.centering, cts[0], cts[1])
    return {"a": da, "b": db, "params": dp}


def example_coda_params(rng, d, k, bias=True, scalars=True) -> dict[str, Any]:
    p = {"w_e": rng.standard_normal((k, d)) / d**0.5, "w_n": rng.standard_normal((k, d)) / d**0.5}
    if bias:
        p["b_e"] = 0.1 * rng.standard_normal(k)  # b_n cancels in F_N(a_i) - F_N(b_j): gradient 0
    if scalars:
        p.update(
            alpha=abs(rng.standard_normal(1)) + 0.5, beta=abs(rng.standard_normal(1)) * 0.3 + 0.2
        )
    return p


def _can_fwd(xp, arrays, options, save):
    return ref.can_forward(xp, arrays["p"], arrays["q"], arrays["params"], options.tau, save)


def _can_bwd(xp, saved, options, cts):
    dp, dq, dpar = ref.can_backward(xp, saved, options.tau, cts[0], cts[1])
    return {"p": dp, "q": dq, "params": dpar}


def example_can_params(rng, m, hidden, bias=True) -> dict[str, Any]:
    p = {
        "w1": rng.standard_normal((hidden, m, 1, 1)) / m**0.5,
        "w2": rng.standard_normal((m, hidden, 1, 1)) / hidden**0.5,
    }
    if bias:
        p.update(b1=0.1 * rng.standard_normal(hidden), b2=0.1 * rng.standard_normal(m))
    return p


CODA_REFERENCE = Kernel(_coda_fwd, _coda_bwd, dtypes=None)
CAN_REFERENCE = Kernel(_can_fwd, _can_bwd, dtypes=None)

"""Glue of sparse (strided / fixed) attention: options, residual schema and reference kernel."""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.sparse import head_parts, sparse_backward, sparse_forward

__all__ = ["head_parts", "SPARSE_REFERENCE", "SPARSE_RESIDUALS", "SparseOptions"]


@dataclass(frozen=True)
class SparseOptions(Options):
    heads: tuple[
        tuple[tuple, ...], ...
    ]  # every head's key-set parts (_reference.sparse.head_parts)
    stride: int
    scale: float


SPARSE_RESIDUALS = ("q", "k", "v", "out", "lse")


def _sparse_ref_fwd(xp, arrays, options, save):
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    out, lse = sparse_forward(
        xp, q, k, v, heads=list(options.heads), stride=options.stride, scale=options.scale
    )
    return (out,), ({"q": q, "k": k, "v": v, "out": out, "lse": lse} if save else {})


def _sparse_ref_bwd(xp, saved, options, cotangents):
    dq, dk, dv = sparse_backward(
        xp,
        saved["q"],
        saved["k"],
        saved["v"],
        saved["out"],
        saved["lse"],
        cotangents[0],
        heads=list(options.heads),
        stride=options.stride,
        scale=options.scale,
    )
    return {"q": dq, "k": dk, "v": dv}


SPARSE_REFERENCE = Kernel(_sparse_ref_fwd, _sparse_ref_bwd, dtypes=None)

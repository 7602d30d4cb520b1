"""Glue of sparse (strided / fixed) attention: options, residual schema and reference kernel."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.attention import sdpa_backward, sdpa_forward
from .._reference.sparse import head_parts, sparse_backward, sparse_forward

__all__ = ["head_parts", "sparse_adapter", "SPARSE_REFERENCE", "SPARSE_RESIDUALS", "SparseOptions"]


@dataclass(frozen=True)
class SparseOptions(Options):
    heads: tuple[
        tuple[tuple, ...], ...
    ]  # every head's key-set parts (_reference.sparse.head_parts)
    stride: int
    scale: float


SPARSE_RESIDUALS = ("q", "k", "v", "out", "lse")


def sparse_adapter(kernel: Kernel, *, takes_xp: bool = False) -> Kernel:
    """The block-sparse decomposition run on a backend's dense attention pair.

    A backend's sparse kernel is its scaled dot-product attention pair in the SDPA convention of
    :mod:`arrayattn._glue.attention` (``kernel.fwd``/``kernel.bwd``); the band, residue and
    summary pieces of every head group run through it and merge by logsumexp. With ``takes_xp``
    the pair takes the namespace first (the array-API reference).
    """
    if takes_xp:
        attention = (kernel.fwd, kernel.bwd)
    else:
        attention = (
            lambda xp, *args, **kwargs: kernel.fwd(*args, **kwargs),
            lambda xp, *args, **kwargs: kernel.bwd(*args, **kwargs),
        )

    def fwd(xp, arrays, options: SparseOptions, save):
        q, k, v = arrays["q"], arrays["k"], arrays["v"]
        out, lse = sparse_forward(
            xp, q, k, v, heads=list(options.heads), stride=options.stride, scale=options.scale,
            attention=attention,
        )  # fmt: skip
        return (out,), ({"q": q, "k": k, "v": v, "out": out, "lse": lse} if save else {})

    def bwd(xp, saved, options: SparseOptions, cotangents):
        dq, dk, dv = sparse_backward(
            xp, saved["q"], saved["k"], saved["v"], saved["out"], saved["lse"], cotangents[0],
            heads=list(options.heads), stride=options.stride, scale=options.scale,
            attention=attention,
        )  # fmt: skip
        return {"q": dq, "k": dk, "v": dv}

    return dataclasses.replace(kernel, fwd=fwd, bwd=bwd)


SPARSE_REFERENCE = sparse_adapter(Kernel(sdpa_forward, sdpa_backward, dtypes=None), takes_xp=True)

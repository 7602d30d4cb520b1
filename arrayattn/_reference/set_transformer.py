"""Array-API pieces of the Set Transformer blocks: the row-wise feed-forward layer, optional layer
norm, head split/merge. The blocks themselves (``arrayattn/set_transformer.py``)
compose these with the attention ops.

Parameter keys (PyTorch ``Linear`` layouts), with an optional prefix:
``w_ff (F, d_in)``, ``b_ff (F,)`` and optionally ``w_ff2 (d_out, F)``, ``b_ff2 (d_out,)``:
``rFF(h) = relu(h w_ffᵀ + b_ff)`` or ``relu(h w_ffᵀ + b_ff) w_ff2ᵀ + b_ff2``.
"""

from __future__ import annotations

from typing import Any

from .._xp import Array
from .primitives import (
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
)

__all__ = [
    "merge_heads",
    "norm_backward",
    "norm_forward",
    "rff_backward",
    "rff_forward",
    "split_heads",
]


def rff_forward(xp: Any, h: Array, p: dict, prefix: str = "") -> tuple[Array, dict]:
    """Row-wise feed-forward layer; returns ``(out, saved)``."""
    z1 = linear_forward(xp, h, p[prefix + "w_ff"], p.get(prefix + "b_ff"))
    r = relu_forward(xp, z1)
    saved = {"in": h, "z1": z1}
    if p.get(prefix + "w_ff2") is None:
        return r, saved
    out = linear_forward(xp, r, p[prefix + "w_ff2"], p.get(prefix + "b_ff2"))
    return out, {**saved, "r": r}


def rff_backward(
    xp: Any, saved: dict, p: dict, dout: Array, prefix: str = ""
) -> tuple[Array, dict]:
    """``(dh, grads)`` with grads keyed like ``p`` (prefixed)."""
    grads = {}
    if p.get(prefix + "w_ff2") is not None:
        with_b = p.get(prefix + "b_ff2") is not None
        dr, grads[prefix + "w_ff2"], db2 = linear_backward(
            xp, saved["r"], p[prefix + "w_ff2"], dout, with_b
        )
        if with_b:
            grads[prefix + "b_ff2"] = db2
    else:
        dr = dout
    dz1 = relu_backward(xp, saved["z1"], dr)
    with_b = p.get(prefix + "b_ff") is not None
    dh, grads[prefix + "w_ff"], db1 = linear_backward(
        xp, saved["in"], p[prefix + "w_ff"], dz1, with_b
    )
    if with_b:
        grads[prefix + "b_ff"] = db1
    return dh, grads


def norm_forward(xp: Any, x: Array, p: dict, name: str, on: bool, eps: float) -> tuple[Array, dict]:
    """Layer norm ``name`` (``ln0``/``ln1``, affine if ``{name}_weight``/``_bias`` given) or
    identity."""
    if not on:
        return x, {}
    y, mean, rstd = layer_norm_forward(xp, x, p.get(f"{name}_weight"), p.get(f"{name}_bias"), eps)
    return y, {"x": x, "mean": mean, "rstd": rstd}


def norm_backward(
    xp: Any, saved: dict, p: dict, name: str, on: bool, dy: Array
) -> tuple[Array, dict]:
    if not on:
        return dy, {}
    w, b = p.get(f"{name}_weight"), p.get(f"{name}_bias")
    dx, dw, db = layer_norm_backward(
        xp, saved["x"], w, saved["mean"], saved["rstd"], dy, b is not None
    )
    grads = {}
    if w is not None:
        grads[f"{name}_weight"] = dw
    if b is not None:
        grads[f"{name}_bias"] = db
    return dx, grads


def split_heads(xp: Any, x: Array, heads: int) -> Array:
    """(N, n, h·w) → (N, h, n, w): head i is the i-th contiguous slice of columns."""
    n, length, width = x.shape
    return xp.permute_dims(xp.reshape(x, (n, length, heads, width // heads)), (0, 2, 1, 3))


def merge_heads(xp: Any, x: Array) -> Array:
    n, heads, length, width = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (n, length, heads * width))

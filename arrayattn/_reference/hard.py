"""Array-API reference of the stochastic / discrete attention ops.

All randomness comes in as arrays of uniforms, so every function here is deterministic:

* hard (Show, Attend and Tell) attention: inverse-CDF sampling of a location from
  ``α = softmax(e)``, the glimpse, ``log p(s̃|a) = log α_s̃`` and the entropy of ``α``;
* Gumbel-softmax (Concrete) with an optional straight-through one-hot forward;
* the hard-concrete gate of Louizos et al. (head gates of Voita et al.) and its L0 penalty.
"""

from __future__ import annotations

import math
from typing import Any

from .._xp import Array, compute_dtype, device_of, sum_to_shape

__all__ = [
    "gumbel_backward",
    "gumbel_forward",
    "hard_attention_backward",
    "hard_attention_forward",
    "hard_concrete_backward",
    "hard_concrete_forward",
]


def _cast(xp: Any, x: Array, dtype: Any) -> Array:
    return xp.astype(x, dtype, copy=False)


def _log_softmax(xp: Any, s: Array, axis: int) -> Array:
    """Stable log-softmax along ``axis``; a slice of all ``-inf`` gives ``-inf`` everywhere."""
    m = xp.max(s, axis=axis, keepdims=True)
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    z = s - m
    total = xp.sum(xp.exp(z), axis=axis, keepdims=True)
    return z - xp.log(xp.where(total == 0, xp.ones_like(total), total))


def _one_hot_argmax(xp: Any, y: Array, axis: int) -> Array:
    """Boolean one-hot of the first maximum of ``y`` along ``axis``."""
    idx = xp.argmax(y, axis=axis, keepdims=True)
    n = y.shape[axis]
    shape = [1] * y.ndim
    shape[axis] = n
    pos = xp.reshape(xp.arange(n, device=device_of(y)), tuple(shape))
    return pos == idx


# -- hard attention -------------------------------------------------------------------------------


def hard_attention_forward(
    xp: Any, a: Array, e: Array, u: Array, mask: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """Returns ``(glimpse, sample, log_prob, entropy, log_alpha)``.

    ``sample`` is the one-hot (in a's dtype) of the location ``s̃ = min{i : cdf_i > u · cdf_L}``
    (inverse-CDF sampling; locations with ``α_i = 0`` are never drawn; if rounding leaves no
    ``cdf_i > u · cdf_L`` the last location with ``α_i > 0`` is taken). A fully masked row draws
    nothing: glimpse 0, log_prob 0, entropy 0. ``log_alpha`` (compute dtype) is kept for backward.
    """
    cdt = compute_dtype(xp, a.dtype)
    dev = device_of(a)
    s = _cast(xp, e, cdt)
    if mask is not None:
        s = xp.where(mask, s, xp.asarray(-math.inf, dtype=cdt, device=dev))
    log_alpha = _log_softmax(xp, s, -1)
    alpha = xp.exp(log_alpha)
    positive = alpha > 0
    some = xp.any(positive, axis=-1, keepdims=True)
    cdf = xp.cumulative_sum(alpha, axis=-1)
    t = _cast(xp, u, cdt)[..., None] * cdf[..., -1:]
    above = cdf > t
    first = xp.argmax(_cast(xp, above, xp.int8), axis=-1, keepdims=True)
    n = alpha.shape[-1]
    last = (n - 1) - xp.argmax(
        _cast(xp, xp.flip(positive, axis=-1), xp.int8), axis=-1, keepdims=True
    )
    idx = xp.where(xp.any(above, axis=-1, keepdims=True), first, last)
    hit = xp.logical_and(xp.arange(n, device=dev) == idx, some)
    sample = _cast(xp, hit, cdt)
    glimpse = xp.matmul(sample[..., None, :], _cast(xp, a, cdt))[..., 0, :]
    zero = xp.zeros((), dtype=cdt, device=dev)
    log_prob = xp.sum(xp.where(hit, log_alpha, zero), axis=-1)
    entropy = -xp.sum(alpha * xp.where(positive, log_alpha, zero), axis=-1)
    return (
        xp.astype(glimpse, a.dtype),
        xp.astype(sample, a.dtype),
        xp.astype(log_prob, e.dtype),
        xp.astype(entropy, e.dtype),
        log_alpha,
    )


def hard_attention_backward(
    xp: Any,
    sample: Array,
    log_alpha: Array,
    entropy: Array,
    dglimpse: Array,
    dlog_prob: Array,
    dentropy: Array,
    a_dtype: Any,
    e_dtype: Any,
) -> tuple[Array, Array]:
    """``(da, de)``: ``da_i = s_i dz``; ``de = dlogp (s − α) − dH α (log α + H)``.

    The glimpse does not depend on ``e`` (sampling is not differentiable); the REINFORCE term
    enters through the cotangent of ``log_prob``.
    """
    cdt = log_alpha.dtype
    s = _cast(xp, sample, cdt)
    da = s[..., :, None] * _cast(xp, dglimpse, cdt)[..., None, :]
    alpha = xp.exp(log_alpha)
    zero = xp.zeros((), dtype=cdt, device=device_of(log_alpha))
    safe_log = xp.where(alpha > 0, log_alpha, zero)
    ent = _cast(xp, entropy, cdt)[..., None]
    de = _cast(xp, dlog_prob, cdt)[..., None] * (s - alpha)
    de = de - _cast(xp, dentropy, cdt)[..., None] * alpha * (safe_log + ent)
    return xp.astype(da, a_dtype), xp.astype(de, e_dtype)


# -- Gumbel-softmax --------------------------------------------------------------------------------


def gumbel_forward(
    xp: Any, logits: Array, u: Array, *, tau: float, hard: bool, axis: int, eps: float
) -> tuple[Array, Array]:
    """Returns ``(y, y_soft)``: ``y_soft = softmax((logits + g)/τ)`` with ``g = −log(−log u)``,
    ``u`` clamped to ``[eps, 1 − eps]``; ``y`` is ``y_soft``, or its one-hot argmax when ``hard``.
    ``y_soft`` is in the compute dtype (backward needs it)."""
    cdt = compute_dtype(xp, logits.dtype)
    uc = xp.clip(_cast(xp, u, cdt), eps, 1.0 - eps)
    g = -xp.log(-xp.log(uc))
    y_soft = xp.exp(_log_softmax(xp, (_cast(xp, logits, cdt) + g) / tau, axis))
    y = _cast(xp, _one_hot_argmax(xp, y_soft, axis), cdt) if hard else y_soft
    return xp.astype(y, logits.dtype), y_soft


def gumbel_backward(
    xp: Any, y_soft: Array, dy: Array, *, tau: float, axis: int, dtype: Any
) -> Array:
    """Soft (and straight-through) VJP: ``dℓ = (1/τ) y ⊙ (dy − ⟨dy, y⟩)``."""
    dyc = _cast(xp, dy, y_soft.dtype)
    inner = xp.sum(dyc * y_soft, axis=axis, keepdims=True)
    return xp.astype(y_soft * (dyc - inner) / tau, dtype)


# -- hard-concrete gates ---------------------------------------------------------------------------


def _sigmoid(xp: Any, x: Array) -> Array:
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def hard_concrete_forward(
    xp: Any,
    log_alpha: Array,
    u: Array | None,
    *,
    beta: float,
    gamma: float,
    zeta: float,
    eps: float,
    training: bool,
    hard: bool,
) -> tuple[Array, Array, Array, Array]:
    """Returns ``(gate, l0, s, s_bar)``; ``s`` and ``s_bar`` (compute dtype) are kept for backward.

    training: ``s = σ((log u − log(1 − u) + log α)/β)``, u clamped to ``[eps, 1 − eps]``;
    eval: ``s = σ(log α)``. Then ``s̄ = s (ζ − γ) + γ``, ``g = clip(s̄, 0, 1)`` (``1[g > 1/2]``
    with ``hard``), ``l0 = Σ σ(log α − β log(−γ/ζ))``.
    """
    cdt = compute_dtype(xp, log_alpha.dtype)
    la = _cast(xp, log_alpha, cdt)
    if training:
        uc = xp.clip(_cast(xp, u, cdt), eps, 1.0 - eps)
        s = _sigmoid(xp, (xp.log(uc) - xp.log1p(-uc) + la) / beta)
    else:
        s = _sigmoid(xp, la)
    s_bar = s * (zeta - gamma) + gamma
    g = xp.clip(s_bar, 0.0, 1.0)
    if hard:
        g = _cast(xp, g > 0.5, cdt)
    l0 = xp.sum(_sigmoid(xp, la - beta * math.log(-gamma / zeta)))
    return xp.astype(g, log_alpha.dtype), xp.astype(l0, log_alpha.dtype), s, s_bar


def hard_concrete_backward(
    xp: Any,
    log_alpha: Array,
    s: Array,
    s_bar: Array,
    dgate: Array,
    dl0: Array,
    *,
    beta: float,
    gamma: float,
    zeta: float,
    training: bool,
) -> Array:
    """``∂g/∂log α = 1[0 < s̄ < 1] (ζ − γ) s (1 − s) / β_eff`` (β_eff = β training, 1 eval),
    summed over the broadcast axes; plus ``dl0 · σ'(log α − β log(−γ/ζ))``."""
    cdt = s.dtype
    inside = xp.logical_and(s_bar > 0, s_bar < 1)
    slope = (zeta - gamma) * s * (1.0 - s) / (beta if training else 1.0)
    zero = xp.zeros((), dtype=cdt, device=device_of(s))
    dla = xp.where(inside, _cast(xp, dgate, cdt) * slope, zero)
    dla = sum_to_shape(xp, dla, tuple(log_alpha.shape))
    p = _sigmoid(xp, _cast(xp, log_alpha, cdt) - beta * math.log(-gamma / zeta))
    dla = dla + _cast(xp, dl0, cdt) * p * (1.0 - p)
    return xp.astype(dla, log_alpha.dtype)

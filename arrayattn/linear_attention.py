"""Efficient attention (Shen et al.) and linear attention (Katharopoulos et al.)."""

from __future__ import annotations

from . import _checks as checks
from ._glue.linear_attention import (
    EFFICIENT_REFERENCE,
    EFFICIENT_RESIDUALS,
    LINEAR_REFERENCE,
    LINEAR_RESIDUALS,
    LinearAttentionOptions,
)
from ._kernel import Call, NoOptions
from ._op import op
from ._xp import Array

__all__ = ["efficient_attention", "linear_attention"]


def _check_qkv(q, k, v, *, same_length: bool):
    xp = checks.namespace(q=q, k=k, v=v)
    checks.check_qkv(xp, q, k, v)
    if same_length and k.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"k: causal linear attention needs Lk = L = {q.shape[-2]} (from q), "
            f"got shape {tuple(k.shape)}"
        )
    return xp


# -- efficient attention ------------------------------------------------------------------------


def _eff_examples(rng):
    q = rng.standard_normal((2, 7, 3))
    k = rng.standard_normal((2, 9, 3))
    v = rng.standard_normal((2, 9, 4))
    return [((q, k, v), {}), ((q[0, :2], k[0, :4], v[0, :4]), {})]


@op(
    differentiable=("q", "k", "v"),
    reference=EFFICIENT_REFERENCE,
    residuals=EFFICIENT_RESIDUALS,
    examples=_eff_examples,
)
def efficient_attention(q: Array, k: Array, v: Array) -> Call[Array]:
    r"""Efficient attention (Shen et al., "Attention with linear complexities"), softmax form.

    ``out = softmax_features(q) · (softmax_positions(k)ᵀ v)``: each query row is soft-maxed over
    its ``d`` features, each key column over the ``Lk`` positions, and the (d × dv) context
    ``k̃ᵀ v`` is formed first, so time and memory grow linearly with the length. Each output row
    is a convex combination of the context rows; there is no ``1/sqrt(d)`` scale and it is *not*
    equal to softmax dot-product attention.

    Parameters
    ----------
    q : array, shape (..., L, d)
        Queries.
    k : array, shape (..., Lk, d)
        Keys.
    v : array, shape (..., Lk, dv)
        Values.

    Returns
    -------
    out : array, shape (..., L, dv)
        In the dtype of ``q``.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions (one head per slice, as in the official
    module's contiguous channel groups), ``L`` queries, ``Lk`` keys, ``d`` query/key width,
    ``dv`` value width. For a feature map (N, C, H, W) pass positions ``n = H·W`` on axis -2.
    ``.bwd`` gives gradients for ``q``, ``k``, ``v``; the derivation is in *Efficient and linear
    attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 4, 100, 8)), rng.standard_normal((2, 4, 100, 8))
    >>> v = rng.standard_normal((2, 4, 100, 16))
    >>> out, res = aa.efficient_attention.fwd(q, k, v)
    >>> g = aa.efficient_attention.bwd(res, np.ones_like(out))
    >>> out.shape, g.k.shape
    ((2, 4, 100, 16), (2, 4, 100, 8))
    """
    xp = _check_qkv(q, k, v, same_length=False)
    return Call(xp, {"q": q, "k": k, "v": v}, NoOptions())


# -- linear attention ---------------------------------------------------------------------------


def _lin_examples(rng):
    q = rng.standard_normal((2, 7, 3))
    k = rng.standard_normal((2, 9, 3))
    v = rng.standard_normal((2, 9, 4))
    return [
        ((q, k, v), {}),
        ((q, k[:, :7], v[:, :7]), {"causal": True}),
        ((q, k[:, :7], v[:, :7]), {"causal": True, "eps": 0.5}),
    ]


@op(
    differentiable=("q", "k", "v"),
    reference=LINEAR_REFERENCE,
    residuals=LINEAR_RESIDUALS,
    examples=_lin_examples,
)
def linear_attention(
    q: Array, k: Array, v: Array, *, causal: bool = False, eps: float = 1e-6
) -> Call[Array]:
    r"""Linear attention (Katharopoulos et al., "Transformers are RNNs") with ``φ = elu + 1``.

    ``out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps)`` with ``S = Σ_j φ(k_j) v_jᵀ`` and
    ``z = Σ_j φ(k_j)``; with ``causal=True`` the sums run over ``j <= i`` (prefix sums). Time
    and memory grow linearly with the length: the causal form is computed chunk by chunk with the
    prefix state carried, and its backward pass carries suffix sums instead of storing every
    prefix state.

    Parameters
    ----------
    q : array, shape (..., L, d)
        Queries.
    k : array, shape (..., Lk, d)
        Keys; ``Lk = L`` when ``causal``.
    v : array, shape (..., Lk, dv)
        Values.
    causal : bool, default False
        Query i sees keys j <= i.
    eps : float, default 1e-6
        Added to the denominator (as in ``fast-transformers``); must be >= 0.

    Returns
    -------
    out : array, shape (..., L, dv)
        In the dtype of ``q``.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``L`` queries, ``Lk`` keys, ``d``
    query/key width, ``dv`` value width. No ``1/sqrt(d)`` scale (the paper has none). Key padding
    is expressed by zero rows of ``φ(k)``, i.e. by dropping those keys. ``.bwd`` gives gradients
    for ``q``, ``k``, ``v``; the derivation is in *Efficient and linear attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 300, 8), dtype=np.float32) for _ in range(3))
    >>> out, res = aa.linear_attention.fwd(q, k, v, causal=True)
    >>> g = aa.linear_attention.bwd(res, np.ones_like(out))
    >>> out.shape, out.dtype, g.q.shape
    ((2, 4, 300, 8), dtype('float32'), (2, 4, 300, 8))
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    xp = _check_qkv(q, k, v, same_length=causal)
    eps = checks.check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    return Call(xp, {"q": q, "k": k, "v": v}, LinearAttentionOptions(causal=causal, eps=eps))

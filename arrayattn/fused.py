"""Fused attention: M queries pooled into one output."""

from __future__ import annotations

import math

from . import _checks as checks
from ._glue.fused import (
    FUSED_REFERENCE,
    FUSED_RESIDUALS,
    FusedOptions,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["fused_attention"]

_FUSE = ("mean", "max")


def _examples(rng):
    q = rng.standard_normal((2, 3, 4))
    k = rng.standard_normal((2, 6, 4))
    v = rng.standard_normal((2, 6, 5))
    mask = rng.random((2, 3, 6)) > 0.3
    mask[1, 1] = False  # one fully masked query
    params = {"w_o": rng.standard_normal((3, 5)), "b_o": rng.standard_normal(3)}
    return [
        ((q, k, v), {}),
        ((q, k, v), {"fuse": "max", "return_weights": True}),
        ((q, k, v), {"mask": mask, "params": params, "scale": 0.7}),
        ((q, k, v), {"mask": mask, "fuse": "max", "params": params}),
    ]


@op(
    differentiable=("q", "k", "v", "params"),
    reference=FUSED_REFERENCE,
    residuals=FUSED_RESIDUALS,
    examples=_examples,
)
def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    fuse: str = "mean",
    mask: Array | None = None,
    params: dict[str, Array] | None = None,
    return_weights: bool = False,
) -> Call[Array]:
    r"""Fused attention: pool ``L`` values into one output with the attention of ``M`` queries.

    ``P = softmax_L(scale · q kᵀ)`` is the ordinary attention of every query over the ``L`` keys
    (the spec's column-wise softmax of ``Kᵀ Q``), ``α = fuse_m(P)`` combines the ``M``
    distributions into one distribution over the keys, and ``out = g(αᵀ v)``:

    * ``fuse='mean'``: ``α_l = (1/M) Σ_m P_ml``; then ``αᵀ v`` is the mean of the ``M`` rows of
      ``scaled_dot_product_attention(q, k, v)``;
    * ``fuse='max'``: ``α_l = max_m P_ml / Σ_l' max_m P_ml'`` (max over the queries, then
      renormalised);
    * ``g`` is the identity, or the Linear map ``x ↦ x w_oᵀ + b_o`` when ``params`` is given.

    Parameters
    ----------
    q : array, shape (..., M, d)
        Queries. Leading dimensions (batch, heads) must equal those of ``k`` and ``v``.
    k : array, shape (..., L, d)
        Keys.
    v : array, shape (..., L, dv)
        Values.
    scale : float, optional
        Logit scale; ``None`` means ``1/sqrt(d)``.
    fuse : {'mean', 'max'}, default 'mean'
        How the ``M`` attention distributions are combined.
    mask : bool array, optional
        Broadcastable to (..., M, L); ``True`` = may attend. A fully masked query has ``P = 0``
        (it still counts in the mean's ``1/M``, as the zero output of a fully masked row of
        :func:`scaled_dot_product_attention` would); if every query is fully masked, ``α = 0``.
    params : mapping of str to array, optional
        Output map in PyTorch ``Linear`` layout: ``w_o`` (Eo, dv), optional ``b_o`` (Eo,).
    return_weights : bool, default False
        Also return ``α``.

    Returns
    -------
    out : array, shape (..., dv), or (..., Eo) with ``params``
        In the dtype of ``q``.
    weights : array, shape (..., L)
        Only with ``return_weights``: ``α`` (sums to 1 over L unless everything is masked).

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``M`` queries, ``L`` keys/values, ``d``
    query/key width, ``dv`` value width, ``Eo`` output width of the optional map. ``.bwd`` gives
    gradients for ``q``, ``k``, ``v`` and ``params``; with ``fuse='max'`` the gradient of each key
    column goes to its first maximising query (ties are measure-zero for real inputs). The
    ``M × L`` probabilities are recomputed in backward from the saved per-query logsumexp; they are
    materialised (fused attention pools a few queries). See the documentation page *Fused
    attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 3, 4))      # 3 queries
    >>> k = rng.standard_normal((2, 7, 4))      # 7 inputs
    >>> v = rng.standard_normal((2, 7, 5))
    >>> out, alpha = aa.fused_attention(q, k, v, return_weights=True)
    >>> out.shape, alpha.shape, np.allclose(alpha.sum(-1), 1)
    ((2, 5), (2, 7), True)
    >>> mean_of_rows = aa.scaled_dot_product_attention(q, k, v).mean(axis=-2)
    >>> bool(np.allclose(out, mean_of_rows))
    True
    >>> out, res = aa.fused_attention.fwd(q, k, v, fuse="max")
    >>> g = aa.fused_attention.bwd(res, np.ones_like(out))
    >>> g.q.shape, g.params
    ((2, 3, 4), None)
    """
    xp = checks.namespace(
        q=q, k=k, v=v, mask=mask, **{f"params[{n!r}]": a for n, a in (params or {}).items()}
    )
    checks.check_qkv(xp, q, k, v, key_length="L")
    if q.shape[-2] == 0:
        raise ValueError(f"q: expected at least one query (M >= 1), got shape {tuple(q.shape)}")
    checks.check_choice("fuse", fuse, _FUSE)
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights: expected a bool, got {type(return_weights).__name__}")
    if mask is not None:
        checks.check_bool(xp, "mask", mask)
        checks.check_broadcastable(
            "mask", mask.shape, tuple(q.shape[:-1]) + (k.shape[-2],), "(..., M, L)"
        )
    clean = None
    if params is not None:
        w_o = params.get("w_o") if hasattr(params, "get") else None
        eo = w_o.shape[0] if w_o is not None and w_o.ndim == 2 else 0
        if w_o is not None and w_o.ndim != 2:
            raise ValueError(
                f"params['w_o']: expected a 2-D (Eo, dv) weight, got shape {tuple(w_o.shape)}"
            )
        clean = checks.check_params(params, {"w_o": (eo, v.shape[-1])}, {"b_o": (eo,)})
        checks.check_same_dtype(q=q, **{f"params[{n!r}]": a for n, a in clean.items()})
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    else:
        scale = checks.check_real("scale", scale)
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "mask": mask, "params": clean},
        FusedOptions(
            scale=scale,
            fuse=fuse,
            return_weights=return_weights,
            with_bias=clean is not None and "b_o" in clean,
        ),
        ("out", "weights") if return_weights else ("out",),
    )

"""Merging partial attention results computed over disjoint key sets (split-KV, ring attention)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat

from . import _checks as checks
from ._glue.merge import MERGE_REFERENCE, MERGE_RESIDUALS, MergeOptions
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["merge_attention"]


def _merge_examples(rng):
    """Small float64 calls (``python -m arrayattn check``), with empty rows and empty parts."""
    outs = tuple(rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    lses = tuple(rng.standard_normal((2, 3, 5)) for _ in range(3))
    # Part 1 attended nothing in rows 0-1; no part attended anything in row 4 of item (1, 2).
    masked_outs = [o.copy() for o in outs]
    masked_lses = [lse.copy() for lse in lses]
    masked_outs[1][..., :2, :] = 0.0
    masked_lses[1][..., :2] = math.inf
    for o, lse in zip(masked_outs, masked_lses, strict=True):
        o[1, 2, 4] = 0.0
        lse[1, 2, 4] = math.inf
    return [
        ((outs[:2], lses[:2]), {}),
        ((tuple(masked_outs), tuple(masked_lses)), {}),
        ((outs[:1], lses[:1]), {}),
    ]


def _sequence(name: str, value: Any) -> tuple[Array, ...]:
    if array_api_compat.is_array_api_obj(value) or not isinstance(value, (tuple, list)):
        raise TypeError(
            f"{name}: expected a sequence (tuple or list) of arrays, one per part, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise ValueError(f"{name}: expected at least one part, got an empty sequence")
    return tuple(value)


@op(
    differentiable=("outs", "lses"),
    reference=MERGE_REFERENCE,
    residuals=MERGE_RESIDUALS,
    examples=_merge_examples,
)
def merge_attention(outs: Sequence[Array], lses: Sequence[Array]) -> Call[tuple[Array, Array]]:
    r"""Merge attention outputs computed over disjoint key sets into the output over their union.

    Part ``i`` is the attention of the same queries over one set of keys: its output ``o_i`` and
    its per-row logsumexp ``l_i`` (``scaled_dot_product_attention(..., return_lse=True)``). With
    the key sets disjoint, the attention over all of them is::

        lse = log Σ_i exp(l_i)            out = Σ_i exp(l_i - lse) · o_i

    exactly (xformers ``merge_attentions``, FlashAttention's split-KV combine). A part that
    attended no key in a row (output 0, logsumexp ``+inf``, this library's convention) contributes
    nothing to it; a row that no part attended gives output 0 and logsumexp ``+inf``.

    Parameters
    ----------
    outs : sequence of arrays, shape (..., L, dv)
        The parts' outputs, one dtype, one shape.
    lses : sequence of arrays, shape (..., L)
        Their logsumexps, as many as ``outs``, one real floating dtype (float32, or float64 for
        float64 outputs, as :func:`scaled_dot_product_attention` returns them).

    Returns
    -------
    out : array, shape (..., L, dv)
        In the dtype of ``outs``; accumulated in at least float32.
    lse : array, shape (..., L)
        In the dtype of ``lses``; ``+inf`` where no part attended anything.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``L`` queries, ``dv`` value width. Gradients
    (``.bwd``) exist for ``outs`` and ``lses``, each a tuple with one array per part: with
    ``p_i = exp(l_i - lse)``, ``d o_i = p_i dO`` and ``d l_i = p_i (dO·o_i - dO·out + dlse)``.
    Parts and rows that attended nothing get zero gradients, never NaN.

    Examples
    --------
    Attention over 10 keys, computed as two parts of 6 and 4 keys and merged:

    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 3, 8))                     # (heads, L, d)
    >>> k, v = rng.standard_normal((2, 2, 10, 8))
    >>> sdpa = aa.scaled_dot_product_attention
    >>> o1, l1 = sdpa(q, k[:, :6], v[:, :6], return_lse=True)
    >>> o2, l2 = sdpa(q, k[:, 6:], v[:, 6:], return_lse=True)
    >>> out, lse = aa.merge_attention((o1, o2), (l1, l2))
    >>> whole, whole_lse = sdpa(q, k, v, return_lse=True)
    >>> bool(np.allclose(out, whole)), bool(np.allclose(lse, whole_lse))
    (True, True)
    >>> g = aa.merge_attention.bwd(aa.merge_attention.fwd((o1, o2), (l1, l2))[1],
    ...                            (np.ones_like(out), None))
    >>> len(g.outs), g.lses[0].shape
    (2, (2, 3))
    """
    outs, lses = _sequence("outs", outs), _sequence("lses", lses)
    if len(lses) != len(outs):
        raise ValueError(
            f"lses: expected one logsumexp per part ({len(outs)} parts in outs), got {len(lses)}"
        )
    labelled = {f"outs[{i}]": o for i, o in enumerate(outs)}
    labelled.update({f"lses[{i}]": lse for i, lse in enumerate(lses)})
    xp = checks.namespace(**labelled)
    checks.check_floating(xp, "outs[0]", outs[0])
    checks.check_floating(xp, "lses[0]", lses[0])
    checks.check_ndim("outs[0]", outs[0], 2, "(..., L, dv)")
    checks.check_same_dtype(**{f"outs[{i}]": o for i, o in enumerate(outs)})
    checks.check_same_dtype(**{f"lses[{i}]": lse for i, lse in enumerate(lses)})
    shape = tuple(outs[0].shape)
    for i, o in enumerate(outs):
        if tuple(o.shape) != shape:
            raise ValueError(
                f"outs[{i}]: expected shape (..., L, dv) = {shape} (from outs[0]), "
                f"got {tuple(o.shape)}"
            )
    for i, lse in enumerate(lses):
        if tuple(lse.shape) != shape[:-1]:
            raise ValueError(
                f"lses[{i}]: expected shape (..., L) = {shape[:-1]} (from outs[0]), "
                f"got {tuple(lse.shape)}"
            )
    return Call(
        xp, {"outs": outs, "lses": lses}, MergeOptions(parts=len(outs)), outputs=("out", "lse")
    )

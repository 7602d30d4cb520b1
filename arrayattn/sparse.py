"""Sparse Transformer factorised attention (Child et al. 2019): the public ops."""

from __future__ import annotations

import math
from typing import Any

from . import _checks as checks
from ._glue.sparse import (
    SPARSE_REFERENCE,
    SPARSE_RESIDUALS,
    SparseOptions,
    head_parts,
    sparse_adapter,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["sparse_attention", "sparse_attention_mask"]

_PATTERNS = ("strided", "fixed")
_COMBINE = ("merged", "interleaved", "multihead")


def _check_pattern(pattern, stride, summary, local_width, combine, layer, num_heads):
    """Validate the pattern options; returns ``(stride, summary, local_width, layer)``."""
    checks.check_choice("pattern", pattern, _PATTERNS)
    checks.check_choice("combine", combine, _COMBINE)
    stride = checks.check_int("stride", stride, minimum=1)
    layer = checks.check_int("layer", layer, minimum=0)
    if pattern == "strided":
        if summary is not None:
            raise ValueError(
                f"summary: only the 'fixed' pattern has a summary width, got {summary!r} with "
                "pattern='strided'"
            )
        local_width = (
            stride + 1
            if local_width is None
            else checks.check_int("local_width", local_width, minimum=1)
        )
    else:
        if local_width is not None:
            raise ValueError(
                f"local_width: only the 'strided' pattern has a local band, got {local_width!r} "
                "with pattern='fixed' (its local part is the query's block of length stride)"
            )
        if summary is None:
            raise ValueError("summary: the 'fixed' pattern needs the summary width c, got None")
        summary = checks.check_int("summary", summary, minimum=1)
        if summary > stride:
            raise ValueError(
                f"summary: expected 1 <= c <= stride = {stride} (the block length), got {summary}"
            )
        if combine == "multihead" and stride % summary:
            raise ValueError(
                f"summary: with combine='multihead' the heads use distinct sub-blocks of length c, "
                f"so c must divide stride = {stride}; got {summary}"
            )
    return stride, summary, local_width, layer


def _paper_sets(xp, i, j, pattern, ell, c, w, sel):
    """The paper's A^(1), A^(2) (or h'-th summary sub-block) as a boolean of index arrays i, j."""
    causal = j <= i
    if pattern == "strided":
        a1 = xp.logical_and(causal, i - j < w)
        a2 = xp.logical_and(causal, (i - j) % ell == 0)
    else:
        sub = 0 if not isinstance(sel, tuple) else sel[1]
        a1 = xp.logical_and(causal, (i // ell) == (j // ell))
        r = j % ell
        a2 = xp.logical_and(causal, xp.logical_and(r >= ell - (sub + 1) * c, r < ell - sub * c))
    if sel == 1:
        return a1
    if sel == 2:
        return a2
    return xp.logical_or(a1, a2)


def sparse_attention_mask(
    length: int,
    *,
    pattern: str,
    stride: int,
    summary: int | None = None,
    local_width: int | None = None,
    combine: str = "merged",
    layer: int = 0,
    num_heads: int | None = None,
    xp: Any = None,
    device: Any = None,
) -> Array:
    r"""The dense boolean keep-mask of a Sparse Transformer pattern (True = may attend).

    Built elementwise from the paper's index sets (§4.3), for tests, plots and small inputs;
    :func:`sparse_attention` never builds it. All sets are causal (``j <= i``):

    * ``'strided'`` (stride ``l``): ``A1 = {j : 0 <= i - j < local_width}`` and
      ``A2 = {j : (i - j) mod l = 0}``;
    * ``'fixed'`` (block length ``l``, summary width ``c``): ``A1 = {j : ⌊j/l⌋ = ⌊i/l⌋}`` and
      ``A2 = {j : l - c <= j mod l < l}`` (the last ``c`` positions of every block).

    Parameters
    ----------
    length : int
        Sequence length L.
    pattern : {'strided', 'fixed'}
    stride : int
        ``l``: the stride (``'strided'``) or the block length (``'fixed'``).
    summary : int, optional
        ``c``, the summary width of ``'fixed'`` (required there, 1 <= c <= l; not allowed for
        ``'strided'``).
    local_width : int, optional
        Number of positions ``{i - w + 1, ..., i}`` of the strided pattern's local band. Default
        ``l + 1``, the paper's ``A1 = {max(0, i - l), ..., i}``; openai's code uses ``l``.
        Only for ``'strided'``.
    combine : {'merged', 'interleaved', 'multihead'}, default 'merged'
        How the two factorised sets are used (§4.4): ``'merged'`` attends to ``A1 ∪ A2``;
        ``'interleaved'`` to ``A^(layer mod 2 + 1)`` (the set of residual block ``layer``);
        ``'multihead'`` gives head ``h`` its own pattern: ``'strided'`` heads alternate between
        ``A1`` (even h) and ``A2`` (odd h); ``'fixed'`` head h attends to its block and to the
        summary sub-block ``h' = h mod (l/c)``, ``{j : l-(h'+1)c <= j mod l < l-h'c}`` (openai's
        per-head summary columns; head 0 gets the paper's last ``c``).
    layer : int, default 0
        Index of the residual block, for ``'interleaved'``.
    num_heads : int, optional
        Number of heads, required for ``'multihead'`` (the mask then has a heads axis).
    xp : namespace, optional
        Array namespace of the result (default NumPy).
    device : optional
        Device of the result.

    Returns
    -------
    mask : bool array, shape (L, L), or (num_heads, L, L) for ``'multihead'``

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> m = aa.sparse_attention_mask(6, pattern="strided", stride=2)
    >>> np.flatnonzero(m[5]).tolist()     # query 5: {3, 4, 5} ∪ {1, 3, 5}
    [1, 3, 4, 5]
    >>> aa.sparse_attention_mask(8, pattern="fixed", stride=4, summary=2,
    ...                          combine="multihead", num_heads=2).shape
    (2, 8, 8)
    """
    length = checks.check_int("length", length, minimum=0)
    stride, summary, local_width, layer = _check_pattern(
        pattern, stride, summary, local_width, combine, layer, num_heads
    )
    if combine == "multihead":
        if num_heads is None:
            raise ValueError("num_heads: combine='multihead' needs the number of heads, got None")
        num_heads = checks.check_int("num_heads", num_heads, minimum=1)
    if xp is None:
        import array_api_compat.numpy as xp
    i = xp.arange(length, device=device)[:, None]
    j = xp.arange(length, device=device)[None, :]
    args = (pattern, stride, summary, local_width)
    if combine == "merged":
        return _paper_sets(xp, i, j, *args, "merged")
    if combine == "interleaved":
        return _paper_sets(xp, i, j, *args, layer % 2 + 1)
    assert num_heads is not None  # 'multihead' requires it (checked above)
    sels: list[Any]
    if pattern == "strided":
        sels = [h % 2 + 1 for h in range(num_heads)]
    else:
        assert summary is not None
        sels = [("sub", h % (stride // summary)) for h in range(num_heads)]
    return xp.stack([_paper_sets(xp, i, j, *args, s) for s in sels])


# -- sparse attention ---------------------------------------------------------------------------


def _sparse_examples(rng):
    q = rng.standard_normal((1, 4, 11, 3))
    k = rng.standard_normal((1, 4, 11, 3))
    v = rng.standard_normal((1, 4, 11, 2))
    return [
        ((q, k, v), {"pattern": "strided", "stride": 3}),
        ((q, k, v), {"pattern": "strided", "stride": 3, "local_width": 3, "combine": "multihead"}),
        ((q, k, v), {"pattern": "fixed", "stride": 4, "summary": 2}),
        (
            (q, k, v),
            {"pattern": "fixed", "stride": 4, "summary": 1, "combine": "interleaved", "layer": 1},
        ),
        ((q, k, v), {"pattern": "fixed", "stride": 4, "summary": 2, "combine": "multihead"}),
    ]


@op(
    differentiable=("q", "k", "v"),
    reference=SPARSE_REFERENCE,
    residuals=SPARSE_RESIDUALS,
    adapt=sparse_adapter,
    examples=_sparse_examples,
)
def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    pattern: str,
    stride: int,
    summary: int | None = None,
    local_width: int | None = None,
    combine: str = "merged",
    layer: int = 0,
    scale: float | None = None,
) -> Call[Array]:
    r"""Sparse Transformer factorised self-attention, executed block-sparsely.

    Equal to ``scaled_dot_product_attention(q, k, v, mask=sparse_attention_mask(L, ...))`` but
    the work is proportional to the number of attended pairs and no L×L array exists: the
    pattern is split into disjoint dense pieces (a band, a residue-regrouped causal attention,
    per-block causal attention, gathered summary columns) whose results are merged through their
    logsumexps into one softmax. The options are those of :func:`sparse_attention_mask`.

    Parameters
    ----------
    q : array, shape (..., L, d)
        Queries; with ``combine='multihead'`` axis -3 is the heads axis.
    k : array, shape (..., L, d)
        Keys (self-attention: the same L as ``q``).
    v : array, shape (..., L, dv)
        Values.
    pattern : {'strided', 'fixed'}
    stride : int
        ``l``: the stride (``'strided'``) or block length (``'fixed'``), ≈ sqrt(L) in the paper.
    summary : int, optional
        ``c`` of the ``'fixed'`` pattern.
    local_width : int, optional
        Width of the strided pattern's local band, default ``l + 1`` (paper); ``l`` is openai's.
    combine : {'merged', 'interleaved', 'multihead'}, default 'merged'
        See :func:`sparse_attention_mask`.
    layer : int, default 0
        Residual-block index for ``'interleaved'``.
    scale : float, optional
        Logit scale, default ``1/sqrt(d)``.

    Returns
    -------
    out : array, shape (..., L, dv)
        In the dtype of ``q``. A query with nothing to attend to (possible only for the
        ``'fixed'`` pattern's ``A2`` alone) gives 0.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``L`` sequence length, ``d`` query/key
    width, ``dv`` value width. The patterns are causal (autoregressive), as in the paper.
    ``.bwd`` gives gradients for ``q``, ``k``, ``v``; see *Sparse Transformer attention* in the
    derivations for the decomposition and its backward.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 64, 8)) for _ in range(3))
    >>> out = aa.sparse_attention(q, k, v, pattern="strided", stride=8)
    >>> mask = aa.sparse_attention_mask(64, pattern="strided", stride=8)
    >>> bool(np.allclose(out, aa.scaled_dot_product_attention(q, k, v, mask=mask)))
    True
    """
    xp = checks.namespace(q=q, k=k, v=v)
    legend = {"q": "(..., L, d)", "k": "(..., L, d)", "v": "(..., L, dv)"}
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(xp, name, x)
        checks.check_ndim(name, x, 2, legend[name])
    checks.check_same_dtype(q=q, k=k, v=v)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(
            f"v: expected shape {tuple(q.shape[:-1])} + (dv,) (from q), got {tuple(v.shape)}"
        )
    stride, summary, local_width, layer = _check_pattern(
        pattern, stride, summary, local_width, combine, layer, None
    )
    if combine == "multihead":
        if q.ndim < 3:
            raise ValueError(
                f"q: combine='multihead' needs a heads axis, shape (..., heads, L, d), "
                f"got {tuple(q.shape)}"
            )
        num_heads = q.shape[-3]
    else:
        num_heads = 1
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    else:
        scale = checks.check_real("scale", scale)
    heads = tuple(head_parts(pattern, stride, summary, local_width, combine, layer, num_heads))
    return Call(
        xp, {"q": q, "k": k, "v": v}, SparseOptions(heads=heads, stride=stride, scale=scale)
    )

"""Scaled dot-product attention and multi-head attention: the public ops."""

from __future__ import annotations

import math

from . import _checks as checks
from ._glue.attention import (
    MHA_BIASES,
    MHA_REFERENCE,
    MHA_RESIDUALS,
    MHA_WEIGHTS,
    SDPA_REFERENCE,
    SDPA_RESIDUALS,
    MhaOptions,
    SdpaOptions,
    sdpa_adapter,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["multi_head_attention", "scaled_dot_product_attention"]

_CAUSAL = (False, True, "top_left", "bottom_right")


# -- scaled dot-product attention ---------------------------------------------------------------


def _sdpa_examples(rng):
    """Small float64 calls covering the options (used by ``python -m arrayattn check``)."""
    q = rng.standard_normal((2, 3, 7, 5))
    k = rng.standard_normal((2, 3, 9, 5))
    v = rng.standard_normal((2, 3, 9, 4))
    mask = rng.random((2, 1, 7, 9)) > 0.3
    mask[0, 0, 2] = False  # one fully masked row
    bias = rng.standard_normal((3, 7, 9))
    return [
        ((q, k, v), {}),
        ((q, k, v), {"mask": mask, "bias": bias}),
        ((q, k, v), {"causal": "bottom_right", "return_lse": True}),
        ((q, k[:, :1], v[:, :1]), {"enable_gqa": True, "causal": True}),
    ]


@op(
    differentiable=("q", "k", "v", "bias"),
    reference=SDPA_REFERENCE,
    residuals=SDPA_RESIDUALS,
    adapt=sdpa_adapter,
    examples=_sdpa_examples,
)
def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> Call[Array]:
    r"""Scaled dot-product attention, ``softmax(scale·q kᵀ + bias, masked) v``.

    Computed tile by tile with an online softmax (FlashAttention-2), so the extra memory is
    O(L·d): the Lq×Lk score matrix never exists once L exceeds one tile. float16 and bfloat16
    inputs are accumulated in float32.

    Parameters
    ----------
    q : array, shape (..., Lq, d)
        Queries. Leading dimensions are batch and heads.
    k : array, shape (..., Lk, d)
        Keys, same leading dimensions as ``q`` (but see ``enable_gqa``).
    v : array, shape (..., Lk, dv)
        Values.
    mask : bool array, optional
        Broadcastable to (..., Lq, Lk). ``True`` = may attend (PyTorch's
        ``scaled_dot_product_attention`` convention; the opposite of ``nn.MultiheadAttention``).
    bias : array, optional
        Additive float bias broadcastable to (..., Lq, Lk), added to the scaled logits; ``-inf``
        entries mask. Its gradient is returned in its own shape.
    causal : bool or {'top_left', 'bottom_right'}, default False
        ``True`` or ``'top_left'``: query i attends to keys j <= i (PyTorch's ``is_causal``).
        ``'bottom_right'``: keys j <= i + Lk - Lq (FlashAttention >= 2.1); the two agree when
        Lq == Lk.
    scale : float, optional
        Logit scale; ``None`` means ``1/sqrt(d)``.
    enable_gqa : bool, default False
        Grouped-query attention as in PyTorch: ``k`` and ``v`` have Hkv heads on axis -3 and
        ``q`` has Hq, a multiple of Hkv; query head h uses kv head ``h // (Hq // Hkv)``.
    return_lse : bool, default False
        Also return the per-row logsumexp of the scaled, biased, masked logits.

    Returns
    -------
    out : array, shape (..., Lq, dv)
        In the dtype of ``q``. A row with nothing to attend to gives 0.
    lse : array, shape (..., Lq)
        Only with ``return_lse``: float32 (float64 for float64 inputs); ``+inf`` for a row with
        nothing to attend to.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``Lq`` queries, ``Lk`` keys, ``d`` query/key
    width, ``dv`` value width. Gradients (``.bwd``) exist for ``q``, ``k``, ``v`` and ``bias``;
    a fully masked row has zero gradients, never NaN. The derivation is in the documentation
    page *Scaled dot-product attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 2, 4, 8), dtype=np.float32)     # (N, heads, L, d)
    >>> out, lse = aa.scaled_dot_product_attention(q, q, q, causal=True, return_lse=True)
    >>> out.shape, lse.shape, out.dtype
    ((1, 2, 4, 8), (1, 2, 4), dtype('float32'))
    >>> out, res = aa.scaled_dot_product_attention.fwd(q, q, q)
    >>> g = aa.scaled_dot_product_attention.bwd(res, np.ones_like(out))
    >>> g.q.shape, g.bias
    ((1, 2, 4, 8), None)
    """
    xp = checks.namespace(q=q, k=k, v=v, mask=mask, bias=bias)
    checks.check_qkv(xp, q, k, v, same_batch=False)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    groups = 1
    if enable_gqa:
        if q.ndim < 3:
            raise ValueError(
                f"q: enable_gqa needs a heads axis, shape (..., H, Lq, d), got {tuple(q.shape)}"
            )
        hq, hkv = q.shape[-3], k.shape[-3]
        if hkv == 0 or hq % hkv or v.shape[-3] != hkv:
            raise ValueError(
                f"k, v: with enable_gqa the kv heads (axis -3) must divide the query heads "
                f"{hq}, got k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        groups = hq // hkv
        batch_q = tuple(q.shape[:-3])
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape[:-3]) != batch_q:
                raise ValueError(
                    f"{name}: expected leading dimensions {batch_q} (from q), got shape "
                    f"{tuple(x.shape)}"
                )
    else:
        batch_q = tuple(q.shape[:-2])
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape[:-2]) != batch_q:
                hint = " (set enable_gqa=True for grouped-query attention)" if q.ndim >= 3 else ""
                raise ValueError(
                    f"{name}: expected leading dimensions {batch_q} (from q), "
                    f"got shape {tuple(x.shape)}{hint}"
                )
    scores_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    if mask is not None:
        checks.check_bool(xp, "mask", mask)
        checks.check_broadcastable("mask", mask.shape, scores_shape, "(..., Lq, Lk)")
    if bias is not None:
        checks.check_floating(xp, "bias", bias)
        checks.check_broadcastable("bias", bias.shape, scores_shape, "(..., Lq, Lk)")
    checks.check_choice("causal", causal, _CAUSAL)
    causal_mode = None if causal is False else ("top_left" if causal is True else str(causal))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0  # d = 0: every logit is 0
    else:
        scale = checks.check_real("scale", scale)
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "mask": mask, "bias": bias},
        SdpaOptions(scale=scale, causal=causal_mode, gqa_groups=groups, return_lse=return_lse),
        ("out", "lse") if return_lse else ("out",),
    )


# -- multi-head attention -----------------------------------------------------------------------


def _mha_examples(rng):
    e, heads = 6, 2
    params = {
        "w_q": rng.standard_normal((e, e)) / 2,
        "w_k": rng.standard_normal((e, 5)) / 2,
        "w_v": rng.standard_normal((4, 5)) / 2,
        "w_o": rng.standard_normal((3, 4)) / 2,
        "b_q": rng.standard_normal(e),
        "b_o": rng.standard_normal(3),
    }
    x_q = rng.standard_normal((2, 4, e))
    x_kv = rng.standard_normal((2, 7, 5))
    mask = rng.random((4, 7)) > 0.3
    return [
        ((x_q, x_kv, params), {"num_heads": heads}),
        ((x_q, x_kv, params), {"num_heads": heads, "mask": mask, "causal": True}),
    ]


@op(
    differentiable=("x_q", "x_kv", "params"),
    reference=MHA_REFERENCE,
    residuals=MHA_RESIDUALS,
    examples=_mha_examples,
)
def multi_head_attention(
    x_q: Array,
    x_kv: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    mask: Array | None = None,
    causal: bool | str = False,
) -> Call[Array]:
    r"""Multi-head attention (Vaswani et al. §3.2.2), as ``torch.nn.MultiheadAttention``.

    ``Y = Concat_i(softmax(Q_i K_iᵀ / sqrt(dh)) V_i) W_oᵀ + b_o`` with ``Q = x_q W_qᵀ + b_q``,
    ``K = x_kv W_kᵀ + b_k``, ``V = x_kv W_vᵀ + b_v``; head i is the i-th contiguous slice of
    ``dh`` columns. Equal to ``torch.nn.MultiheadAttention(batch_first=True)`` with its packed
    ``in_proj_weight`` split in three (``w_q, w_k, w_v = in_proj_weight.chunk(3)``). The attention
    core runs through :func:`scaled_dot_product_attention` on the active backend.

    Parameters
    ----------
    x_q : array, shape (N, Lq, E)
        Query-side inputs.
    x_kv : array, shape (N, Lk, Ekv)
        Key/value-side inputs (``x_kv = x_q`` for self-attention).
    params : mapping of str to array
        PyTorch ``Linear`` layout (out, in): ``w_q`` (h·dh, E), ``w_k`` (h·dh, Ekv),
        ``w_v`` (h·dv, Ekv), ``w_o`` (Eo, h·dv); optional biases ``b_q`` (h·dh,), ``b_k``
        (h·dh,), ``b_v`` (h·dv,), ``b_o`` (Eo,).
    num_heads : int
        h; must divide the output widths of ``w_q`` and ``w_v``.
    mask : bool array, optional
        Broadcastable to (N, h, Lq, Lk); ``True`` = may attend. (``nn.MultiheadAttention``'s
        boolean masks mean the opposite: pass ``~attn_mask``.)
    causal : bool or {'top_left', 'bottom_right'}, default False
        As in :func:`scaled_dot_product_attention`.

    Returns
    -------
    y : array, shape (N, Lq, Eo)

    Notes
    -----
    Shape legend: ``N`` batch, ``Lq``/``Lk`` query/key lengths, ``E``/``Ekv`` input widths,
    ``h`` heads, ``dh``/``dv`` per-head query/value widths, ``Eo`` output width. ``.bwd`` gives
    gradients for ``x_q``, ``x_kv`` and every entry of ``params`` (a dict with the same keys).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> E, h = 8, 2
    >>> params = {f"w_{n}": rng.standard_normal((E, E)) / E for n in "qkvo"}
    >>> x = rng.standard_normal((3, 5, E))
    >>> y, res = aa.multi_head_attention.fwd(x, x, params, num_heads=h, causal=True)
    >>> g = aa.multi_head_attention.bwd(res, np.ones_like(y))
    >>> y.shape, sorted(g.params)
    ((3, 5, 8), ['w_k', 'w_o', 'w_q', 'w_v'])
    """
    labelled = checks.param_arrays(params)
    xp = checks.namespace(x_q=x_q, x_kv=x_kv, mask=mask, **labelled)
    checks.check_floating(xp, "x_q", x_q)
    checks.check_ndim("x_q", x_q, 3, "(N, Lq, E)", exact=True)
    checks.check_ndim("x_kv", x_kv, 3, "(N, Lk, Ekv)", exact=True)
    checks.check_same_dtype(x_q=x_q, x_kv=x_kv, **labelled)
    if x_kv.shape[0] != x_q.shape[0]:
        raise ValueError(
            f"x_kv: expected batch N = {x_q.shape[0]} (from x_q), got shape {tuple(x_kv.shape)}"
        )
    heads = checks.check_int("num_heads", num_heads, minimum=1)
    e, ekv = x_q.shape[-1], x_kv.shape[-1]
    for key in MHA_WEIGHTS:
        if params.get(key) is None:
            raise ValueError(f"params: missing required key {key!r}")
        if params[key].ndim != 2:
            raise ValueError(
                f"params['{key}']: expected a 2-D (out, in) weight, got shape "
                f"{tuple(params[key].shape)}"
            )
    dqk, dvh, eo = params["w_q"].shape[0], params["w_v"].shape[0], params["w_o"].shape[0]
    for width, key in ((dqk, "w_q"), (dvh, "w_v")):
        if width % heads:
            raise ValueError(
                f"params['{key}']: output width {width} is not divisible by num_heads = {heads}"
            )
    clean = checks.check_params(
        params,
        {"w_q": (dqk, e), "w_k": (dqk, ekv), "w_v": (dvh, ekv), "w_o": (eo, dvh)},
        {"b_q": (dqk,), "b_k": (dqk,), "b_v": (dvh,), "b_o": (eo,)},
    )
    if mask is not None:
        checks.check_bool(xp, "mask", mask)
        checks.check_broadcastable(
            "mask", mask.shape, (x_q.shape[0], heads, x_q.shape[1], x_kv.shape[1]), "(N, h, Lq, Lk)"
        )
    checks.check_choice("causal", causal, _CAUSAL)
    return Call(
        xp,
        {"x_q": x_q, "x_kv": x_kv, "params": clean, "mask": mask},
        MhaOptions(
            num_heads=heads,
            causal=causal if causal else None,
            biases=tuple(sorted(k for k in MHA_BIASES if k in clean)),
        ),
    )

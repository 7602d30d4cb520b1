"""Scaled dot-product attention and multi-head attention (spec section 1)."""

from __future__ import annotations

import math

from . import _checks as checks
from ._op import Call, Kernel, op
from ._reference.attention import sdpa_backward, sdpa_forward
from ._xp import Array, compute_dtype, flat_rows

__all__ = ["multi_head_attention", "scaled_dot_product_attention", "sdpa_kernel"]

_CAUSAL = (False, True, "top_left", "bottom_right")


# -- scaled dot-product attention ---------------------------------------------------------------


def sdpa_kernel(forward, backward, supports=None, *, takes_xp: bool = False) -> Kernel:
    """The :class:`~arrayattn._op.Kernel` of scaled_dot_product_attention from a backend's pair.

    ``forward(q, k, v, *, mask, bias, causal, scale, gqa_groups) -> (out, lse)`` and
    ``backward(q, k, v, out, lse, dout, dlse, *, mask, bias, causal, scale, gqa_groups)
    -> (dq, dk, dv, dbias)``; with ``takes_xp`` both take the namespace first (the reference).
    """

    def options(static):
        return {k: static[k] for k in ("causal", "scale", "gqa_groups")}

    def fwd(xp, arrays, static, save):
        lead = (xp,) if takes_xp else ()
        out, lse = forward(
            *lead,
            arrays["q"],
            arrays["k"],
            arrays["v"],
            mask=arrays["mask"],
            bias=arrays["bias"],
            **options(static),
        )
        outs = (out, lse) if static["return_lse"] else (out,)
        return outs, (dict(arrays, out=out, lse=lse) if save else {})

    def bwd(xp, saved, static, cotangents):
        lead = (xp,) if takes_xp else ()
        dlse = cotangents[1] if static["return_lse"] else None
        dq, dk, dv, dbias = backward(
            *lead,
            saved["q"],
            saved["k"],
            saved["v"],
            saved["out"],
            saved["lse"],
            cotangents[0],
            dlse,
            mask=saved["mask"],
            bias=saved["bias"],
            **options(static),
        )
        return {"q": dq, "k": dk, "v": dv, "bias": dbias}

    return Kernel(fwd, bwd) if supports is None else Kernel(fwd, bwd, supports)


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
    reference=sdpa_kernel(sdpa_forward, sdpa_backward, takes_xp=True),
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
) -> Call:
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
    causal_mode = {False: None, True: "top_left"}.get(causal, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0  # d = 0: every logit is 0
    else:
        scale = checks.check_real("scale", scale)
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "mask": mask, "bias": bias},
        {"scale": scale, "causal": causal_mode, "gqa_groups": groups, "return_lse": return_lse},
        ("out", "lse") if return_lse else ("out",),
    )


# -- multi-head attention -----------------------------------------------------------------------

_MHA_WEIGHTS = ("w_q", "w_k", "w_v", "w_o")
_MHA_BIASES = ("b_q", "b_k", "b_v", "b_o")


def _project(xp, x, w, b, cdt):
    """``x wᵀ + b`` (PyTorch Linear) accumulated in the compute dtype, returned in x's dtype."""
    y = xp.matmul(xp.astype(x, cdt, copy=False), xp.matrix_transpose(xp.astype(w, cdt, copy=False)))
    if b is not None:
        y = y + xp.astype(b, cdt, copy=False)
    return xp.astype(y, x.dtype)


def _split_heads(xp, x, heads):
    n, length, width = x.shape
    return xp.permute_dims(xp.reshape(x, (n, length, heads, width // heads)), (0, 2, 1, 3))


def _merge_heads(xp, x):
    n, heads, length, width = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (n, length, heads * width))


def _mha_ref_fwd(xp, arrays, static, save):
    p = arrays["params"]
    heads = static["num_heads"]
    x_q, x_kv = arrays["x_q"], arrays["x_kv"]
    cdt = compute_dtype(xp, x_q.dtype)
    q = _split_heads(xp, _project(xp, x_q, p["w_q"], p.get("b_q"), cdt), heads)
    k = _split_heads(xp, _project(xp, x_kv, p["w_k"], p.get("b_k"), cdt), heads)
    v = _split_heads(xp, _project(xp, x_kv, p["w_v"], p.get("b_v"), cdt), heads)
    # The attention core runs on whichever backend the setting picks for it.
    kwargs = {"mask": arrays["mask"], "causal": static["causal"] or False}
    if save:
        heads_out, attn_res = scaled_dot_product_attention.fwd(q, k, v, **kwargs)
    else:
        heads_out, attn_res = scaled_dot_product_attention(q, k, v, **kwargs), None
    y = _project(xp, _merge_heads(xp, heads_out), p["w_o"], p.get("b_o"), cdt)
    saved = {}
    if save:
        saved = {"x_q": x_q, "x_kv": x_kv, **{w: p[w] for w in _MHA_WEIGHTS}, "attn": attn_res}
    return (y,), saved


def _linear_bwd(xp, x, w, dy, cdt, with_bias):
    """Gradients of ``y = x wᵀ + b`` over leading dims: (dx, dw, db)."""
    dyc = xp.astype(dy, cdt, copy=False)
    xc = xp.astype(x, cdt, copy=False)
    dx = xp.matmul(dyc, xp.astype(w, cdt, copy=False))
    flat_dy, flat_x = flat_rows(xp, dyc), flat_rows(xp, xc)
    dw = xp.matmul(xp.matrix_transpose(flat_dy), flat_x)
    db = xp.sum(flat_dy, axis=0) if with_bias else None
    return dx, dw, db


def _mha_ref_bwd(xp, saved, static, cotangents):
    (dy,) = cotangents
    x_q, x_kv = saved["x_q"], saved["x_kv"]
    dtype = x_q.dtype
    cdt = compute_dtype(xp, dtype)
    biases = static["biases"]
    attn_res = saved["attn"]
    heads_out = attn_res.arrays["out"]
    d_concat, dw_o, db_o = _linear_bwd(
        xp, _merge_heads(xp, heads_out), saved["w_o"], dy, cdt, "b_o" in biases
    )
    d_heads = _split_heads(xp, xp.astype(d_concat, dtype), static["num_heads"])
    g = scaled_dot_product_attention.bwd(attn_res, d_heads)
    dx_q, dw_q, db_q = _linear_bwd(
        xp, x_q, saved["w_q"], _merge_heads(xp, g.q), cdt, "b_q" in biases
    )
    dxk, dw_k, db_k = _linear_bwd(
        xp, x_kv, saved["w_k"], _merge_heads(xp, g.k), cdt, "b_k" in biases
    )
    dxv, dw_v, db_v = _linear_bwd(
        xp, x_kv, saved["w_v"], _merge_heads(xp, g.v), cdt, "b_v" in biases
    )
    grads = {"w_q": dw_q, "w_k": dw_k, "w_v": dw_v, "w_o": dw_o}
    grads.update({"b_q": db_q, "b_k": db_k, "b_v": db_v, "b_o": db_o})
    params = {key: xp.astype(g_, dtype) for key, g_ in grads.items() if g_ is not None}
    return {
        "x_q": xp.astype(dx_q, dtype),
        "x_kv": xp.astype(dxk + dxv, dtype),
        "params": params,
    }


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
    reference=Kernel(_mha_ref_fwd, _mha_ref_bwd),
    examples=_mha_examples,
    composite=True,
)
def multi_head_attention(
    x_q: Array,
    x_kv: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    mask: Array | None = None,
    causal: bool | str = False,
) -> Call:
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
    w_q, w_v, w_o = params.get("w_q"), params.get("w_v"), params.get("w_o")
    for key in _MHA_WEIGHTS:
        if params.get(key) is None:
            raise ValueError(f"params: missing required key {key!r}")
        if params[key].ndim != 2:
            raise ValueError(
                f"params['{key}']: expected a 2-D (out, in) weight, got shape "
                f"{tuple(params[key].shape)}"
            )
    dqk, dvh, eo = w_q.shape[0], w_v.shape[0], w_o.shape[0]
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
        {
            "num_heads": heads,
            "causal": causal if causal else None,
            "biases": tuple(sorted(k for k in _MHA_BIASES if k in clean)),
        },
    )

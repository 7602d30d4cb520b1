"""Array-API reference of Luong (global, local) and Bahdanau attention.

Plain ``xp.*`` code, no in-place writes. Everything is computed in the compute dtype (float32 for
float16/bfloat16 inputs). Notation (one batch slice): target states ``h_t (T, d_t)``, source
states ``h_s (S, d_s)``, scores ``z (T, S)``, alignment ``a = softmax_s(z)`` over the kept
positions, context ``c = a h_s``.

Additive scores ``z_ts = v · tanh(qa_t + kb_s)`` (Luong ``concat``, Bahdanau) are computed in
chunks of target rows so the ``T×S×d_a`` tensor never exists whole; backward recomputes ``tanh``
chunk by chunk instead of saving it.
"""

from __future__ import annotations

import math
from typing import Any

from .._xp import Array, compute_dtype, device_of, flat_rows

__all__ = [
    "additive_backward",
    "additive_scores",
    "attention_backward",
    "attention_forward",
    "masked_softmax",
]

#: Budget of T×S×d_a elements per chunk of the additive scores.
ADDITIVE_ELEMENTS = 1 << 21


# -- small helpers --------------------------------------------------------------------------------


def _linear(xp: Any, x: Array, w: Array, b: Array | None = None) -> Array:
    """``x wᵀ + b`` (PyTorch Linear layout, w (out, in))."""
    y = xp.matmul(x, xp.matrix_transpose(w))
    return y if b is None else y + b


def _flat_outer(xp: Any, dy: Array, x: Array) -> Array:
    """``Σ_rows dyᵀ x`` over every leading dimension: the weight gradient of a Linear map."""
    return xp.matmul(xp.matrix_transpose(flat_rows(xp, dy)), flat_rows(xp, x))


def _flat_sum(xp: Any, x: Array) -> Array:
    return xp.sum(flat_rows(xp, x), axis=0)


def masked_softmax(xp: Any, z: Array, keep: Array | None) -> Array:
    """Softmax over the last axis restricted to ``keep``; a row with nothing kept gives zeros."""
    if keep is not None:
        z = xp.where(keep, z, xp.asarray(-math.inf, dtype=z.dtype, device=device_of(z)))
    m = xp.max(z, axis=-1, keepdims=True)
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    e = xp.exp(z - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    return e / xp.where(total == 0, xp.ones_like(total), total)


def _ranges(n: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, n)) for i in range(0, n, block)]


def _block(qa: Array, kb: Array) -> int:
    nbatch = math.prod(tuple(qa.shape[:-2]))
    return max(1, ADDITIVE_ELEMENTS // max(1, nbatch * kb.shape[-2] * kb.shape[-1]))


def additive_scores(xp: Any, qa: Array, kb: Array, v: Array) -> Array:
    """``z[..., t, s] = v · tanh(qa[..., t, :] + kb[..., s, :])``, chunked over t."""
    t, s = qa.shape[-2], kb.shape[-2]
    chunks = [
        xp.matmul(xp.tanh(qa[..., t0:t1, None, :] + kb[..., None, :, :]), v)
        for t0, t1 in _ranges(t, _block(qa, kb))
    ]
    if not chunks:
        return xp.zeros(tuple(qa.shape[:-2]) + (0, s), dtype=qa.dtype, device=device_of(qa))
    return xp.concat(chunks, axis=-2)


def additive_backward(xp: Any, qa: Array, kb: Array, v: Array, dz: Array):
    """Gradients ``(dqa, dkb, dv)`` of :func:`additive_scores`, recomputing tanh chunk by chunk."""
    dqa_chunks = []
    dkb = xp.zeros_like(kb)
    dv = xp.zeros_like(v)
    for t0, t1 in _ranges(qa.shape[-2], _block(qa, kb)):
        g = xp.tanh(qa[..., t0:t1, None, :] + kb[..., None, :, :])
        dzc = dz[..., t0:t1, :, None]
        du = (dzc * v) * (1 - g * g)
        dqa_chunks.append(xp.sum(du, axis=-2))
        dkb = dkb + xp.sum(du, axis=-3)
        dv = dv + _flat_sum(xp, dzc * g)
    dqa = xp.concat(dqa_chunks, axis=-2) if dqa_chunks else xp.zeros_like(qa)
    return dqa, dkb, dv


# -- scores ---------------------------------------------------------------------------------------
#
# Score kinds and their parameters (all in the compute dtype):
#   dot       z = h_t h_sᵀ
#   general   z = (h_t w_aᵀ) h_sᵀ                 w_a (d_s, d_t)       (OpenNMT: paper W_a = w_aᵀ)
#   concat    z = v_a · tanh(w_a [h_t; h_s] + b_a) w_a (d_a, d_t + d_s)
#   location  z = h_t w_a[:S]ᵀ + b_a[:S]          w_a (S_max, d_t)
#   additive  z = v_a · tanh(w_a h_t + b_a + u_a h_s)  (Bahdanau; w_a (d_a, d_t), u_a (d_a, d_s))


def _scores(xp: Any, kind: str, h_t: Array, h_s: Array, p: dict) -> tuple[Array, dict]:
    """Scores (..., T, S) and what their backward needs."""
    s = h_s.shape[-2]
    if kind == "dot":
        return xp.matmul(h_t, xp.matrix_transpose(h_s)), {}
    if kind == "general":
        q = _linear(xp, h_t, p["w_a"])
        return xp.matmul(q, xp.matrix_transpose(h_s)), {"q": q}
    if kind == "location":
        b = p.get("b_a")
        return _linear(xp, h_t, p["w_a"][:s, :], None if b is None else b[:s]), {}
    if kind == "concat":
        d_t = h_t.shape[-1]
        w_q, w_k = p["w_a"][:, :d_t], p["w_a"][:, d_t:]
    else:  # additive (Bahdanau)
        w_q, w_k = p["w_a"], p["u_a"]
    qa = _linear(xp, h_t, w_q, p.get("b_a"))
    kb = _linear(xp, h_s, w_k)
    return additive_scores(xp, qa, kb, p["v_a"]), {"qa": qa, "kb": kb}


def _scores_backward(xp, kind, h_t, h_s, p, aux, dz):
    """``(dh_t, dh_s, dparams)`` of :func:`_scores` given the score cotangent ``dz``."""
    if kind == "dot":
        return xp.matmul(dz, h_s), xp.matmul(xp.matrix_transpose(dz), h_t), {}
    if kind == "general":
        dq = xp.matmul(dz, h_s)
        dh_s = xp.matmul(xp.matrix_transpose(dz), aux["q"])
        return xp.matmul(dq, p["w_a"]), dh_s, {"w_a": _flat_outer(xp, dq, h_t)}
    if kind == "location":
        s = h_s.shape[-2]
        w = p["w_a"]
        dw = _flat_outer(xp, dz, h_t)
        pad = w.shape[0] - s
        grads = {}
        if pad:
            dw = xp.concat([dw, xp.zeros((pad, w.shape[1]), dtype=w.dtype, device=device_of(w))])
        grads["w_a"] = dw
        if "b_a" in p:
            db = _flat_sum(xp, dz)
            if pad:
                db = xp.concat([db, xp.zeros((pad,), dtype=w.dtype, device=device_of(w))])
            grads["b_a"] = db
        return xp.matmul(dz, w[:s, :]), xp.zeros_like(h_s), grads
    dqa, dkb, dv = additive_backward(xp, aux["qa"], aux["kb"], p["v_a"], dz)
    grads = {"v_a": dv}
    if "b_a" in p:
        grads["b_a"] = _flat_sum(xp, dqa)
    if kind == "concat":
        d_t = h_t.shape[-1]
        w_q, w_k = p["w_a"][:, :d_t], p["w_a"][:, d_t:]
        grads["w_a"] = xp.concat([_flat_outer(xp, dqa, h_t), _flat_outer(xp, dkb, h_s)], axis=1)
    else:
        w_q, w_k = p["w_a"], p["u_a"]
        grads["w_a"] = _flat_outer(xp, dqa, h_t)
        grads["u_a"] = _flat_outer(xp, dkb, h_s)
    return xp.matmul(dqa, w_q), xp.matmul(dkb, w_k), grads


# -- local windows --------------------------------------------------------------------------------


def _local_centre(xp, h_t, p, local, s_len, cdt):
    """``(pos, centre, aux)``: the real centre p_t as a 0-based position (..., T), the integer
    window centre (as a float array), and what the local-p backward needs."""
    dev = device_of(h_t)
    t_len = h_t.shape[-2]
    if local["mode"] == "monotonic":
        c = xp.arange(t_len, dtype=cdt, device=dev) + local["offset"]
        c = xp.broadcast_to(c, tuple(h_t.shape[:-1]))
        return c, c, {}
    hidden = xp.tanh(_linear(xp, h_t, p["w_p"]))
    sig = 1 / (1 + xp.exp(-xp.matmul(hidden, p["v_p"])))
    scale = s_len if local["p_scale"] == "S" else s_len - 1
    pos = scale * sig - local["index_base"]
    centre = xp.floor(pos) if local["center"] == "floor" else xp.floor(pos + 0.5)
    return pos, centre, {"hidden": hidden, "sig": sig}


def _window_keep(xp, centre, s_len, radius, cdt):
    s = xp.arange(s_len, dtype=cdt, device=device_of(centre))
    dist = s - centre[..., None]
    return xp.logical_and(dist >= -radius, dist <= radius)


def _gaussian(xp, pos, s_len, radius, cdt):
    """``G[..., t, s] = exp(-(s - p_t)² / (2σ²))``, σ = D/2, and ``(s - p_t)/σ²``."""
    sigma2 = (radius / 2) ** 2
    diff = xp.arange(s_len, dtype=cdt, device=device_of(pos)) - pos[..., None]
    return xp.exp(-(diff * diff) / (2 * sigma2)), diff / sigma2


# -- the whole op ---------------------------------------------------------------------------------


def attention_forward(
    xp: Any,
    h_t: Array,
    h_s: Array,
    params: dict,
    mask: Array | None,
    *,
    kind: str,
    local: dict | None = None,
) -> tuple[Array, Array, dict]:
    """Forward of Luong global/local and Bahdanau attention.

    Returns ``(context, weights, saved)``: context (..., T, d_s) and weights (..., T, S) in the
    input dtype; ``saved`` holds the compute-dtype arrays :func:`attention_backward` needs.
    ``local`` is ``None`` for global attention, else a dict with ``mode``, ``window``, ``offset``,
    ``center``, ``p_scale``, ``index_base``.
    """
    dtype = h_t.dtype
    cdt = compute_dtype(xp, dtype)
    ht, hs = xp.astype(h_t, cdt, copy=False), xp.astype(h_s, cdt, copy=False)
    p = {k: xp.astype(a, cdt, copy=False) for k, a in params.items()}
    s_len = hs.shape[-2]
    z, aux = _scores(xp, kind, ht, hs, p)
    keep = mask
    saved = {"aux": aux}
    if local is not None:
        pos, centre, local_aux = _local_centre(xp, ht, p, local, s_len, cdt)
        window = _window_keep(xp, centre, s_len, local["window"], cdt)
        keep = window if keep is None else xp.logical_and(keep, window)
        saved["local"] = dict(local_aux, pos=pos)
    align = masked_softmax(xp, z, keep)
    weights = align
    if local is not None and local["mode"] == "predictive":
        gauss, _ = _gaussian(xp, saved["local"]["pos"], s_len, local["window"], cdt)
        weights = align * gauss
    context = xp.matmul(weights, hs)
    saved["align"] = align
    return xp.astype(context, dtype), xp.astype(weights, dtype), saved


def attention_backward(
    xp: Any,
    h_t: Array,
    h_s: Array,
    params: dict,
    saved: dict,
    dcontext: Array,
    dweights: Array,
    *,
    kind: str,
    local: dict | None = None,
) -> tuple[Array, Array, dict]:
    """``(dh_t, dh_s, dparams)`` in the input dtypes, given the saved record of the forward."""
    dtype = h_t.dtype
    cdt = compute_dtype(xp, dtype)
    ht, hs = xp.astype(h_t, cdt, copy=False), xp.astype(h_s, cdt, copy=False)
    p = {k: xp.astype(a, cdt, copy=False) for k, a in params.items()}
    dc = xp.astype(dcontext, cdt, copy=False)
    align = saved["align"]
    s_len = hs.shape[-2]
    # c = a h_s: da = dA + dc h_sᵀ, dh_s = aᵀ dc.
    da = xp.astype(dweights, cdt, copy=False) + xp.matmul(dc, xp.matrix_transpose(hs))
    weights = align
    dpos = None
    if local is not None and local["mode"] == "predictive":
        gauss, diff = _gaussian(xp, saved["local"]["pos"], s_len, local["window"], cdt)
        weights = align * gauss
        dpos = xp.sum(da * weights * diff, axis=-1)  # ∂G/∂p_t = G (s - p_t)/σ²
        da = da * gauss
    dh_s_ctx = xp.matmul(xp.matrix_transpose(weights), dc)
    dz = align * (da - xp.sum(align * da, axis=-1, keepdims=True))
    dh_t, dh_s, grads = _scores_backward(xp, kind, ht, hs, p, saved.get("aux", {}), dz)
    dh_s = dh_s + dh_s_ctx
    if dpos is not None:
        assert local is not None  # dpos exists for predictive local attention only
        scale = s_len if local["p_scale"] == "S" else s_len - 1
        sig, hidden = saved["local"]["sig"], saved["local"]["hidden"]
        dw = dpos * (scale * sig * (1 - sig))  # p_t = scale·σ(w) - base
        grads["v_p"] = _flat_sum(xp, dw[..., None] * hidden)
        dpre = (dw[..., None] * p["v_p"]) * (1 - hidden * hidden)
        grads["w_p"] = _flat_outer(xp, dpre, ht)
        dh_t = dh_t + xp.matmul(dpre, p["w_p"])
    grads = {k: xp.astype(g, params[k].dtype) for k, g in grads.items()}
    return xp.astype(dh_t, h_t.dtype), xp.astype(dh_s, h_s.dtype), grads

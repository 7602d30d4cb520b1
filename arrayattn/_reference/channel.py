"""Array-API reference of the channel-attention blocks: SE, CBAM, SPANet, attention condenser.

Plain ``xp.*`` code (no in-place writes) built on :mod:`arrayattn._reference.primitives`.
Every ``*_forward(xp, x, params, ...)`` returns ``(y, saved)`` where ``saved`` is a flat dict of
the arrays its ``*_backward(xp, x, params, saved, dy, ...)`` needs; backward returns
``(dx, dparams)`` with ``dparams`` keyed like ``params``. Computation runs in the compute dtype
(float32 for float16/bfloat16 inputs); outputs and gradients are in the input dtypes.

Parameter keys (PyTorch ``Linear`` layout (out, in) for the MLPs, ``Conv2d`` layout for convs):
``w1 (Cr, Cin), b1 (Cr,), w2 (C, Cr), b2 (C,)`` for the excitation MLP ``W2 δ(W1 z)``.
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, compute_dtype, device_of
from . import primitives as P

__all__ = [
    "cbam_backward",
    "cbam_forward",
    "condenser_backward",
    "condenser_forward",
    "se_backward",
    "se_forward",
    "spa_backward",
    "spa_forward",
]


def _c(xp, a, cdt):
    return None if a is None else xp.astype(a, cdt, copy=False)


def mlp_forward(xp: Any, z: Array, params: dict, cdt: Any) -> tuple[Array, Array]:
    """``a = W2 δ(W1 z + b1) + b2``; returns ``(a, h)`` with h the hidden ReLU output."""
    h = P.relu_forward(
        xp, P.linear_forward(xp, z, _c(xp, params["w1"], cdt), _c(xp, params.get("b1"), cdt))
    )
    a = P.linear_forward(xp, h, _c(xp, params["w2"], cdt), _c(xp, params.get("b2"), cdt))
    return a, h


def mlp_backward(
    xp: Any, z: Array, h: Array, params: dict, da: Array, cdt: Any
) -> tuple[Array, dict]:
    """Gradients of :func:`mlp_forward`: ``(dz, {w1, b1, w2, b2})`` (biases only where given)."""
    dh, dw2, db2 = P.linear_backward(xp, h, _c(xp, params["w2"], cdt), da, "b2" in params)
    dpre = P.relu_backward(xp, h, dh)
    dz, dw1, db1 = P.linear_backward(xp, z, _c(xp, params["w1"], cdt), dpre, "b1" in params)
    grads = {"w1": dw1, "w2": dw2, "b1": db1, "b2": db2}
    return dz, {k: v for k, v in grads.items() if v is not None}


def _add_grads(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _cast_grads(xp, grads: dict, params: dict) -> dict:
    return {k: xp.astype(g, params[k].dtype) for k, g in grads.items()}


def _spatial_dot(xp, a, b):
    """``Σ_{h,w} a ⊙ b`` for (N, C, H, W) arrays → (N, C)."""
    n, c = a.shape[0], a.shape[1]
    return xp.vecdot(xp.reshape(a, (n, c, -1)), xp.reshape(b, (n, c, -1)), axis=-1)


def _gate(xp, s):
    return s[:, :, None, None]


# -- squeeze-and-excitation ------------------------------------------------------------------------


def se_forward(xp: Any, x: Array, params: dict) -> tuple[Array, dict]:
    """``y = x ⊙ σ(W2 δ(W1 mean_hw(x) + b1) + b2)`` per channel."""
    cdt = compute_dtype(xp, x.dtype)
    xc = xp.astype(x, cdt, copy=False)
    z = xp.mean(xc, axis=(2, 3))
    a, h = mlp_forward(xp, z, params, cdt)
    s = P.sigmoid_forward(xp, a)
    y = xp.astype(xc * _gate(xp, s), x.dtype)
    return y, {"z": z, "h": h, "s": s}


def se_backward(xp: Any, x: Array, params: dict, saved: dict, dy: Array) -> tuple[Array, dict]:
    """``ds = Σ_hw dy ⊙ x``; MLP backward; ``dx = dy ⊙ s + dz / HW``."""
    cdt = compute_dtype(xp, x.dtype)
    xc, dyc = xp.astype(x, cdt, copy=False), xp.astype(dy, cdt, copy=False)
    s = saved["s"]
    ds = _spatial_dot(xp, dyc, xc)
    da = P.sigmoid_backward(xp, s, ds)
    dz, grads = mlp_backward(xp, saved["z"], saved["h"], params, da, cdt)
    hw = x.shape[2] * x.shape[3]
    dx = dyc * _gate(xp, s) + _gate(xp, dz / float(hw))
    return xp.astype(dx, x.dtype), _cast_grads(xp, grads, params)


# -- CBAM ------------------------------------------------------------------------------------------


def _first_max(xp, flat):
    """max and first argmax along the last axis."""
    return xp.max(flat, axis=-1), xp.argmax(flat, axis=-1)


def cbam_forward(
    xp: Any, x: Array, params: dict, *, pool_order: str = "avg_max"
) -> tuple[Array, dict]:
    """Channel gate ``M_c = σ(MLP(avg_hw x) + MLP(max_hw x))``, ``F' = M_c ⊙ x``; spatial gate
    ``M_s = σ(conv_k×k([avg_c F'; max_c F']))`` (order per ``pool_order``), ``y = M_s ⊙ F'``."""
    cdt = compute_dtype(xp, x.dtype)
    n, c, h, w = x.shape
    xc = xp.astype(x, cdt, copy=False)
    flat = xp.reshape(xc, (n, c, h * w))
    avg = xp.mean(flat, axis=-1)
    mx, arg_hw = _first_max(xp, flat)
    a_avg, h_avg = mlp_forward(xp, avg, params, cdt)
    a_max, h_max = mlp_forward(xp, mx, params, cdt)
    mc = P.sigmoid_forward(xp, a_avg + a_max)
    f1 = xc * _gate(xp, mc)
    c_avg = xp.mean(f1, axis=1)
    c_max = xp.max(f1, axis=1)
    arg_c = xp.argmax(f1, axis=1)
    pools = (c_avg, c_max) if pool_order == "avg_max" else (c_max, c_avg)
    pooled = xp.stack(pools, axis=1)  # (N, 2, H, W)
    ws = xp.astype(params["w_spatial"], cdt, copy=False)
    k = ws.shape[-1]
    logit = P.conv2d_forward(
        xp, pooled, ws, _c(xp, params.get("b_spatial"), cdt), padding=(k // 2, k // 2)
    )
    ms = P.sigmoid_forward(xp, logit)  # (N, 1, H, W)
    y = xp.astype(f1 * ms, x.dtype)
    saved = {
        "avg": avg,
        "mx": mx,
        "arg_hw": arg_hw,
        "h_avg": h_avg,
        "h_max": h_max,
        "mc": mc,
        "pooled": pooled,
        "arg_c": arg_c,
        "ms": ms,
    }
    return y, saved


def cbam_backward(
    xp: Any, x: Array, params: dict, saved: dict, dy: Array, *, pool_order: str = "avg_max"
) -> tuple[Array, dict]:
    """Adjoint of :func:`cbam_forward` (max pools route to the first argmax)."""
    cdt = compute_dtype(xp, x.dtype)
    n, c, h, w = x.shape
    dev = device_of(x)
    xc, dyc = xp.astype(x, cdt, copy=False), xp.astype(dy, cdt, copy=False)
    mc, ms = saved["mc"], saved["ms"]
    f1 = xc * _gate(xp, mc)
    # spatial gate
    dms = xp.sum(dyc * f1, axis=1, keepdims=True)
    dlogit = P.sigmoid_backward(xp, ms, dms)
    ws = xp.astype(params["w_spatial"], cdt, copy=False)
    k = ws.shape[-1]
    dpooled, dws, dbs = P.conv2d_backward(
        xp, saved["pooled"], ws, dlogit, padding=(k // 2, k // 2), with_bias="b_spatial" in params
    )
    i_avg, i_max = (0, 1) if pool_order == "avg_max" else (1, 0)
    d_cavg, d_cmax = dpooled[:, i_avg, ...], dpooled[:, i_max, ...]
    zero = xp.zeros((), dtype=cdt, device=dev)
    chans = xp.reshape(xp.arange(c, device=dev), (1, c, 1, 1))
    route_c = xp.where(chans == saved["arg_c"][:, None, ...], d_cmax[:, None, ...], zero)
    df1 = dyc * ms + d_cavg[:, None, ...] / float(c) + route_c
    # channel gate
    dmc = _spatial_dot(xp, df1, xc)
    da = P.sigmoid_backward(xp, mc, dmc)
    d_avg, g_avg = mlp_backward(xp, saved["avg"], saved["h_avg"], params, da, cdt)
    d_max, g_max = mlp_backward(xp, saved["mx"], saved["h_max"], params, da, cdt)
    grads = _add_grads(g_avg, g_max)
    grads["w_spatial"] = dws
    if dbs is not None:
        grads["b_spatial"] = dbs
    pos = xp.reshape(xp.arange(h * w, device=dev), (1, 1, h * w))
    route_hw = xp.where(pos == saved["arg_hw"][..., None], d_max[..., None], zero)
    dx = df1 * _gate(xp, mc) + _gate(xp, d_avg / float(h * w)) + xp.reshape(route_hw, (n, c, h, w))
    return xp.astype(dx, x.dtype), _cast_grads(xp, grads, params)


# -- SPANet ----------------------------------------------------------------------------------------


def spa_forward(
    xp: Any, x: Array, params: dict, *, levels: tuple[int, ...] = (1, 2, 4)
) -> tuple[Array, dict]:
    """``z = concat_l flatten(adaptive_avg_pool(x, l))`` (each level C-major, levels in order);
    ``y = x ⊙ σ(W2 δ(W1 z + b1) + b2)``."""
    cdt = compute_dtype(xp, x.dtype)
    n = x.shape[0]
    xc = xp.astype(x, cdt, copy=False)
    z = xp.concat(
        [xp.reshape(P.adaptive_avg_pool2d_forward(xp, xc, (ell, ell)), (n, -1)) for ell in levels],
        axis=-1,
    )
    a, h = mlp_forward(xp, z, params, cdt)
    s = P.sigmoid_forward(xp, a)
    return xp.astype(xc * _gate(xp, s), x.dtype), {"z": z, "h": h, "s": s}


def spa_backward(
    xp: Any, x: Array, params: dict, saved: dict, dy: Array, *, levels: tuple[int, ...] = (1, 2, 4)
) -> tuple[Array, dict]:
    cdt = compute_dtype(xp, x.dtype)
    n, c = x.shape[0], x.shape[1]
    xc, dyc = xp.astype(x, cdt, copy=False), xp.astype(dy, cdt, copy=False)
    s = saved["s"]
    da = P.sigmoid_backward(xp, s, _spatial_dot(xp, dyc, xc))
    dz, grads = mlp_backward(xp, saved["z"], saved["h"], params, da, cdt)
    dx = dyc * _gate(xp, s)
    start = 0
    for ell in levels:
        part = xp.reshape(dz[:, start : start + c * ell * ell], (n, c, ell, ell))
        dx = dx + P.adaptive_avg_pool2d_backward(xp, x.shape, part)
        start += c * ell * ell
    return xp.astype(dx, x.dtype), _cast_grads(xp, grads, params)


# -- attention condenser ---------------------------------------------------------------------------


def _embed_forward(xp, q, params, cdt):
    """E: grouped k×k conv + ReLU, pointwise conv + ReLU, then the expand 1×1 conv to C channels."""
    we = _c(xp, params["w_embed"], cdt)
    k = we.shape[-1]
    groups = q.shape[1] // we.shape[1]
    e1 = P.relu_forward(
        xp,
        P.conv2d_forward(
            xp, q, we, _c(xp, params.get("b_embed"), cdt), padding=(k // 2, k // 2), groups=groups
        ),
    )
    e2 = P.relu_forward(
        xp,
        P.conv2d_forward(
            xp, e1, _c(xp, params["w_point"], cdt), _c(xp, params.get("b_point"), cdt)
        ),
    )
    a_low = P.conv2d_forward(
        xp, e2, _c(xp, params["w_expand"], cdt), _c(xp, params.get("b_expand"), cdt)
    )
    return a_low, e1, e2


def condenser_forward(
    xp: Any, x: Array, params: dict, *, pool_size: int, selective: str = "additive"
) -> tuple[Array, dict]:
    """``Q = maxpool_s(V)``, ``K = E(Q)``, ``A = upsample_nearest(K, (H, W))``, ``V' = F(V, A, S)``.

    The expand 1×1 conv runs before the nearest upsampling: a 1×1 conv commutes with it exactly
    (each output pixel is a copy of one input pixel), and this is ``s²`` times cheaper.
    """
    cdt = compute_dtype(xp, x.dtype)
    h, w = x.shape[2], x.shape[3]
    xc = xp.astype(x, cdt, copy=False)
    ps = (pool_size, pool_size)
    q = P.max_pool2d_forward(xp, xc, ps, ps)
    a_low, e1, e2 = _embed_forward(xp, q, params, cdt)
    a = P.upsample_nearest2d_forward(xp, a_low, (h, w))
    s = xp.astype(params["scale"], cdt, copy=False)
    s4 = xp.reshape(s, (1, -1, 1, 1)) if s.ndim else s
    if selective == "additive":
        y = s4 * xc + a
        extra = {}
    else:
        g = P.sigmoid_forward(xp, a)
        y = xc * g * s4 if selective == "product" else xc + xc * g * s4
        extra = {"g": g}
    saved = {"q": q, "e1": e1, "e2": e2, **extra}
    return xp.astype(y, x.dtype), saved


def condenser_backward(
    xp: Any,
    x: Array,
    params: dict,
    saved: dict,
    dy: Array,
    *,
    pool_size: int,
    selective: str = "additive",
) -> tuple[Array, dict]:
    cdt = compute_dtype(xp, x.dtype)
    n, c, h, w = x.shape
    xc, dyc = xp.astype(x, cdt, copy=False), xp.astype(dy, cdt, copy=False)
    s = xp.astype(params["scale"], cdt, copy=False)
    s4 = xp.reshape(s, (1, -1, 1, 1)) if s.ndim else s
    axes = (0, 2, 3) if s.ndim else (0, 1, 2, 3)
    if selective == "additive":
        dx = dyc * s4
        ds = xp.sum(dyc * xc, axis=axes)
        da = dyc
    else:
        g = saved["g"]
        vg = xc * g
        ds = xp.sum(dyc * vg, axis=axes)
        dg = dyc * xc * s4
        dx = dyc * g * s4 if selective == "product" else dyc + dyc * g * s4
        da = P.sigmoid_backward(xp, g, dg)
    q, e1, e2 = saved["q"], saved["e1"], saved["e2"]
    da_low = P.upsample_nearest2d_backward(xp, (n, c) + tuple(e2.shape[2:]), da)
    da_low = xp.reshape(da_low, (n, c, e2.shape[2], e2.shape[3]))
    grads = {}
    de2, grads["w_expand"], grads["b_expand"] = P.conv2d_backward(
        xp, e2, _c(xp, params["w_expand"], cdt), da_low, with_bias="b_expand" in params
    )
    de1, grads["w_point"], grads["b_point"] = P.conv2d_backward(
        xp,
        e1,
        _c(xp, params["w_point"], cdt),
        P.relu_backward(xp, e2, de2),
        with_bias="b_point" in params,
    )
    we = _c(xp, params["w_embed"], cdt)
    k = we.shape[-1]
    dq, grads["w_embed"], grads["b_embed"] = P.conv2d_backward(
        xp,
        q,
        we,
        P.relu_backward(xp, e1, de1),
        padding=(k // 2, k // 2),
        groups=c // we.shape[1],
        with_bias="b_embed" in params,
    )
    ps = (pool_size, pool_size)
    dx = dx + P.max_pool2d_backward(xp, xc, q, dq, ps, ps)
    grads["scale"] = xp.reshape(ds, tuple(params["scale"].shape))
    grads = {k_: v for k_, v in grads.items() if v is not None}
    return xp.astype(dx, x.dtype), _cast_grads(xp, grads, params)

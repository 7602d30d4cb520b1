"""Array-API reference forward/backward of the non-local block.

Plain ``xp.*`` code, no in-place writes. Images are ``(N, C, H, W)``; inside, feature maps are
flattened to ``(N, C, P)`` with ``P = H·W`` positions and every 1×1 convolution is a matrix product
over channels (:func:`conv1x1_forward`). The softmax modes (``embedded_gaussian``, ``gaussian``)
run their attention core through :func:`arrayattn.scaled_dot_product_attention` (tiled, O(P·C')
memory, on the active backend) and keep its :class:`~arrayattn.Residuals`; ``dot`` is evaluated as
``Y = (G Φᵀ / P') Θ`` (associativity, O(P·C'²), no P×P' matrix); ``concat`` builds the dense
P×P' pairwise map (ReLU of a sum has no factorisation).

The 1×1-convolution helpers here are shared with the DANet and co-attention references.
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, compute_dtype, device_of
from .primitives import max_pool2d_backward, max_pool2d_forward

__all__ = [
    "conv1x1_backward",
    "conv1x1_forward",
    "flat",
    "nl_backward",
    "nl_forward",
    "transpose",
]

_POOL = ((2, 2), (2, 2))  # kernel, stride of the subsampling max-pool


def _c(xp: Any, a: Array, dtype: Any) -> Array:
    return xp.astype(a, dtype, copy=False)


def flat(xp: Any, x: Array) -> Array:
    """``(N, C, H, W) -> (N, C, H·W)``."""
    n, c, h, w = x.shape
    return xp.reshape(x, (n, c, h * w))


def transpose(xp: Any, a: Array) -> Array:
    """Swap the last two axes (``(N, C, P) <-> (N, P, C)``)."""
    return xp.matrix_transpose(a)


def _w2d(xp: Any, w: Array) -> Array:
    """A 1×1 ``Conv2d`` weight ``(out, in, 1, 1)`` (or a ``Linear`` weight) as ``(out, in)``."""
    return xp.reshape(w, (w.shape[0], w.shape[1])) if w.ndim == 4 else w


def conv1x1_forward(xp: Any, xf: Array, w: Array, b: Array | None, cdt: Any) -> Array:
    """``y = W x + b`` over channels: ``xf (N, Cin, P)``, ``w (Cout, Cin[, 1, 1])`` -> ``(N, Cout,
    P)``
    in the compute dtype ``cdt``."""
    y = xp.matmul(_c(xp, _w2d(xp, w), cdt), _c(xp, xf, cdt))
    if b is not None:
        y = y + _c(xp, b, cdt)[:, None]
    return y


def conv1x1_backward(
    xp: Any, xf: Array, w: Array, dy: Array, cdt: Any, with_bias: bool
) -> tuple[Array, Array, Array | None]:
    """Gradients of :func:`conv1x1_forward` in ``cdt``: ``(dx (N, Cin, P), dw (w's shape), db)``."""
    w2 = _c(xp, _w2d(xp, w), cdt)
    dy = _c(xp, dy, cdt)
    dx = xp.matmul(xp.matrix_transpose(w2), dy)
    dw = xp.sum(xp.matmul(dy, xp.matrix_transpose(_c(xp, xf, cdt))), axis=0)
    dw = xp.reshape(dw, tuple(w.shape))
    db = xp.sum(dy, axis=(0, 2)) if with_bias else None
    return dx, dw, db


def _pool(xp: Any, a: Array, hw: tuple[int, int]) -> Array:
    """2×2/2 max-pool of a flattened map ``(N, C, H·W)`` -> ``(N, C, H'·W')``."""
    n, c, _ = a.shape
    return flat(xp, max_pool2d_forward(xp, xp.reshape(a, (n, c) + hw), *_POOL))


def _pool_bwd(xp: Any, a: Array, pooled: Array, dpooled: Array, hw: tuple[int, int]) -> Array:
    n, c, _ = a.shape
    hw2 = (hw[0] // 2, hw[1] // 2)
    d = max_pool2d_backward(
        xp,
        xp.reshape(a, (n, c) + hw),
        xp.reshape(pooled, (n, c) + hw2),
        xp.reshape(dpooled, (n, c) + hw2),
        *_POOL,
    )
    return flat(xp, d)


def nl_forward(
    xp: Any,
    x: Array,
    p: dict[str, Array],
    *,
    mode: str,
    subsample: bool,
    scale: float,
    save: bool,
    sdpa: Any,
) -> tuple[Array, dict[str, Any]]:
    """``z = W_z y + b_z + x`` with ``y_i = (1/C(x)) Σ_j f(x_i, x_j) g(x_j)``; returns (z,
    saved)."""

    n, c, h, w = x.shape
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    xf = flat(xp, x)
    hw = (h, w)
    if mode == "gaussian":
        theta = _c(xp, xf, cdt)
        phi_full = theta
    else:
        theta = conv1x1_forward(xp, xf, p["w_theta"], p.get("b_theta"), cdt)
        phi_full = conv1x1_forward(xp, xf, p["w_phi"], p.get("b_phi"), cdt)
    g_full = conv1x1_forward(xp, xf, p["w_g"], p.get("b_g"), cdt)
    if subsample:
        phi, g = _pool(xp, phi_full, hw), _pool(xp, g_full, hw)
    else:
        phi, g = phi_full, g_full
    npos = phi.shape[-1]  # P' key positions (after subsampling)
    saved: dict[str, Any] = {}
    if mode in ("embedded_gaussian", "gaussian"):
        q, k, v = (_c(xp, transpose(xp, a), dtype) for a in (theta, phi, g))
        if save:
            o, saved["attn"] = sdpa.fwd(q, k, v, scale=scale)
        else:
            o = sdpa(q, k, v, scale=scale)
        y = _c(xp, transpose(xp, o), cdt)  # (N, C', P)
    elif mode == "dot":
        m = xp.matmul(g, xp.matrix_transpose(phi)) / npos  # (N, C'g, C'θ)
        y = xp.matmul(m, theta)
        if save:
            saved["m"] = m
    else:  # concat
        wf = _c(xp, _w2d(xp, p["w_f"]), cdt)[0, :]  # (2C',)
        ci = theta.shape[1]
        a = xp.sum(wf[:ci][:, None] * theta, axis=1)  # (N, P)
        b = xp.sum(wf[ci:][:, None] * phi, axis=1)  # (N, P')
        pre = a[:, :, None] + b[:, None, :]  # (N, P, P')
        f = xp.where(pre > 0, pre, xp.zeros((), dtype=cdt, device=device_of(x))) / npos
        y = xp.matmul(g, xp.matrix_transpose(f))  # (N, C', P)
        if save:
            saved["pre"] = pre
    z = conv1x1_forward(xp, y, p["w_z"], p.get("b_z"), cdt) + _c(xp, xf, cdt)
    z = xp.astype(xp.reshape(z, (n, c, h, w)), dtype)
    if save:
        saved.update(x=x, y=y, **{f"p_{k}": v for k, v in p.items()})
        if mode not in ("embedded_gaussian", "gaussian"):
            saved.update(theta=theta, phi=phi, g=g)
        if subsample:
            saved.update(phi_full=phi_full if mode != "gaussian" else None, g_full=g_full)
    return z, saved


def nl_backward(
    xp: Any, saved: dict[str, Any], *, mode: str, subsample: bool, dz: Array, sdpa: Any
) -> tuple[Array, dict[str, Array]]:
    """Gradients of :func:`nl_forward`: ``(dx, dparams)`` (dparams keyed like ``params``)."""

    x = saved["x"]
    p = {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}
    n, c, h, w = x.shape
    hw = (h, w)
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    xf = flat(xp, x)
    dzf = _c(xp, flat(xp, dz), cdt)
    grads: dict[str, Array] = {}
    dy, grads["w_z"], db = conv1x1_backward(xp, saved["y"], p["w_z"], dzf, cdt, "b_z" in p)
    if db is not None:
        grads["b_z"] = db
    dx = dzf  # residual
    if mode in ("embedded_gaussian", "gaussian"):
        gr = sdpa.bwd(saved["attn"], _c(xp, transpose(xp, dy), dtype))
        dtheta, dphi, dg = (_c(xp, transpose(xp, a), cdt) for a in (gr.q, gr.k, gr.v))
    elif mode == "dot":
        theta, phi, g, m = saved["theta"], saved["phi"], saved["g"], saved["m"]
        npos = phi.shape[-1]
        dm = xp.matmul(dy, xp.matrix_transpose(theta))  # (N, C'g, C'θ)
        dtheta = xp.matmul(xp.matrix_transpose(m), dy)
        dg = xp.matmul(dm, phi) / npos
        dphi = xp.matmul(xp.matrix_transpose(dm), g) / npos
    else:  # concat
        theta, phi, g, pre = saved["theta"], saved["phi"], saved["g"], saved["pre"]
        npos = phi.shape[-1]
        zero = xp.zeros((), dtype=cdt, device=device_of(x))
        f = xp.where(pre > 0, pre, zero) / npos
        dg = xp.matmul(dy, f)  # (N, C', P')
        df = xp.matmul(xp.matrix_transpose(dy), g)  # (N, P, P')
        dpre = xp.where(pre > 0, df, zero) / npos
        da = xp.sum(dpre, axis=2)  # (N, P)
        dbb = xp.sum(dpre, axis=1)  # (N, P')
        wf = _c(xp, _w2d(xp, p["w_f"]), cdt)[0, :]
        ci = theta.shape[1]
        dtheta = wf[:ci][:, None] * da[:, None, :]
        dphi = wf[ci:][:, None] * dbb[:, None, :]
        dwf = xp.concat(
            [
                xp.sum(da[:, None, :] * theta, axis=(0, 2)),
                xp.sum(dbb[:, None, :] * phi, axis=(0, 2)),
            ]
        )
        grads["w_f"] = xp.reshape(dwf, tuple(p["w_f"].shape))
    if subsample:
        if mode == "gaussian":
            dphi = _pool_bwd(xp, _c(xp, xf, cdt), _pool(xp, _c(xp, xf, cdt), hw), dphi, hw)
        else:
            dphi = _pool_bwd(xp, saved["phi_full"], _pool(xp, saved["phi_full"], hw), dphi, hw)
        dg = _pool_bwd(xp, saved["g_full"], _pool(xp, saved["g_full"], hw), dg, hw)
    if mode == "gaussian":
        dx = dx + dtheta + dphi
    else:
        for name, d in (("theta", dtheta), ("phi", dphi)):
            dxi, grads[f"w_{name}"], db = conv1x1_backward(
                xp, xf, p[f"w_{name}"], d, cdt, f"b_{name}" in p
            )
            dx = dx + dxi
            if db is not None:
                grads[f"b_{name}"] = db
    dxi, grads["w_g"], db = conv1x1_backward(xp, xf, p["w_g"], dg, cdt, "b_g" in p)
    dx = dx + dxi
    if db is not None:
        grads["b_g"] = db
    dx = xp.astype(xp.reshape(dx, (n, c, h, w)), dtype)
    return dx, {k: xp.astype(v, dtype) for k, v in grads.items()}

"""Glue of the local (windowed) attention family: options, residuals, the window convention.

Every windowed op (neighbourhood attention 1-D/2-D, HaloNet) is one *separable window attention*
on the (..., H, W, d) layout with per-axis window tables
(:class:`~arrayattn._reference.neighborhood.AxisWindows`). Kernels are written in that convention::

    forward(q, k, v, wy, wx, *, boundary, scale, rel_bias, r_h, r_w, block) -> (out, lse)
    backward(q, k, v, out, lse, dout, wy, wx, *, boundary, scale, rel_bias, r_h, r_w, block)
        -> (dq, dk, dv, drel_bias, dr_h, dr_w)

``block`` is HaloNet's ``(block_size, halo_size)`` (``None`` for neighbourhood attention) for
kernels that exploit the blocking. :func:`window_adapter` computes the tables of a call (from its
options and shape), views 1-D calls as 2-D (a trivial y axis), and packs the table gradients in
the form the caller gave ``rel_pos`` in. The SASA block is composite: 1×1 projections in array-API
code and the attention through the ``neighborhood_attention_2d`` op.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.neighborhood import (
    AxisWindows,
    halo_axis_windows,
    na_axis_windows,
    window_attention_backward,
    window_attention_forward,
)
from .._xp import compute_dtype

__all__ = [
    "SASA_BIASES",
    "SASA_REFERENCE",
    "SASA_RESIDUALS",
    "SASA_WEIGHTS",
    "WINDOW_REFERENCE",
    "WINDOW_RESIDUALS",
    "HaloOptions",
    "NaOptions",
    "SasaOptions",
    "na_windows",
    "window_adapter",
]


# -- window tables --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def na_windows(h: int, w: int, kernel: int, dilation: int, boundary: str, causal: bool,
               one_d: bool) -> tuple[AxisWindows, AxisWindows]:  # fmt: skip
    """The (y, x) window tables of neighbourhood attention (``one_d``: a trivial y axis)."""
    if one_d:
        return (
            na_axis_windows(1, 1, 1, "clamp"),
            na_axis_windows(w, kernel, dilation, boundary, causal),
        )
    return (
        na_axis_windows(h, kernel, dilation, boundary),
        na_axis_windows(w, kernel, dilation, boundary),
    )


@functools.lru_cache(maxsize=256)
def _halo_windows(h: int, w: int, block: int, halo: int, ty: int, tx: int):
    return halo_axis_windows(h, block, halo, ty), halo_axis_windows(w, block, halo, tx)


@dataclass(frozen=True)
class NaOptions(Options):
    kernel_size: int
    dilation: int
    boundary: str  # "clamp", "zero" or "mask"
    causal: bool
    scale: float
    one_d: bool  # neighborhood_attention_1d: (..., L, d) viewed as (..., 1, L, d)
    rel_pos_form: str | None = None  # how rel_pos was given: "tuple", "dict" or None
    rel_keys: tuple[str, ...] = ()

    def windows(self, h: int, w: int) -> tuple[AxisWindows, AxisWindows]:
        return na_windows(
            h, w, self.kernel_size, self.dilation, self.boundary, self.causal, self.one_d
        )

    @property
    def window_boundary(self) -> str:
        return self.boundary

    @property
    def block(self) -> None:
        return None


@dataclass(frozen=True)
class HaloOptions(Options):
    block_size: int
    halo_size: int
    tables: tuple[int, int]  # the rows of the r_h / r_w tables
    scale: float
    rel_pos_form: str | None = None
    rel_keys: tuple[str, ...] = ()
    one_d = False

    def windows(self, h: int, w: int) -> tuple[AxisWindows, AxisWindows]:
        return _halo_windows(h, w, self.block_size, self.halo_size, *self.tables)

    @property
    def window_boundary(self) -> str:
        return "zero"

    @property
    def block(self) -> tuple[int, int]:
        return self.block_size, self.halo_size


WINDOW_RESIDUALS = ("q", "k", "v", "out", "lse", "rel_bias", "r_h", "r_w")


def _lift_1d(xp, arrays):
    """The 2-D view (..., 1, L, ·) of a 1-D call's arrays."""
    out = {
        name: (None if a is None else xp.expand_dims(a, axis=-3))
        for name, a in arrays.items()
        if name in ("q", "k", "v", "out", "dout")
    }
    bias = arrays.get("rel_bias")
    out["rel_bias"] = None if bias is None else xp.expand_dims(bias, axis=-2)
    if "lse" in arrays:
        out["lse"] = xp.expand_dims(arrays["lse"], axis=-2)
    return out


def _pack_rel_grads(options, drh, drw):
    form = options.rel_pos_form
    if form is None:
        return None
    if form == "tuple":
        return (drh, drw)
    return {key: g for key, g in (("r_h", drh), ("r_w", drw)) if key in options.rel_keys}


def _window_kwargs(options, rel_bias, r_h, r_w):
    kwargs = dict(boundary=options.window_boundary, scale=options.scale, rel_bias=rel_bias,
                  r_h=r_h, r_w=r_w)  # fmt: skip
    if options.block is not None:
        kwargs["block"] = options.block
    return kwargs


def window_adapter(kernel: Kernel, *, takes_xp: bool = False) -> Kernel:
    """A kernel of the window convention (module docstring) as an op-protocol kernel.

    With ``takes_xp`` both functions take the namespace first (the array-API reference).
    """
    forward, backward = kernel.fwd, kernel.bwd

    def fwd(xp, arrays, options, save):
        a = _lift_1d(xp, arrays) if options.one_d else arrays
        rel = arrays.get("rel_pos") or {}
        r_h, r_w = rel.get("r_h"), rel.get("r_w")
        q = a["q"]
        wy, wx = options.windows(q.shape[-3], q.shape[-2])
        lead = (xp,) if takes_xp else ()
        out, lse = forward(
            *lead, q, a["k"], a["v"], wy, wx, **_window_kwargs(options, a.get("rel_bias"), r_h, r_w)
        )
        if options.one_d:
            out, lse = out[..., 0, :, :], lse[..., 0, :]
        saved = {}
        if save:
            saved = {"q": arrays["q"], "k": arrays["k"], "v": arrays["v"], "out": out, "lse": lse,
                     "rel_bias": arrays.get("rel_bias"), "r_h": r_h, "r_w": r_w}  # fmt: skip
        return (out,), saved

    def bwd(xp, saved, options, cotangents):
        (dout,) = cotangents
        a = dict(saved, dout=dout)
        if options.one_d:
            a = _lift_1d(xp, a)
        q = a["q"]
        wy, wx = options.windows(q.shape[-3], q.shape[-2])
        lead = (xp,) if takes_xp else ()
        dq, dk, dv, dbias, drh, drw = backward(
            *lead, q, a["k"], a["v"], a["out"], a["lse"], a["dout"], wy, wx,
            **_window_kwargs(options, a.get("rel_bias"), saved["r_h"], saved["r_w"]),
        )  # fmt: skip
        if options.one_d:
            dq, dk, dv = dq[..., 0, :, :], dk[..., 0, :, :], dv[..., 0, :, :]
            if dbias is not None:
                dbias = dbias[..., 0, :]
        return {"q": dq, "k": dk, "v": dv, "rel_bias": dbias,
                "rel_pos": _pack_rel_grads(options, drh, drw)}  # fmt: skip

    return dataclasses.replace(kernel, fwd=fwd, bwd=bwd)


def _reference_forward(xp, *args, block=None, **kwargs):
    return window_attention_forward(xp, *args, **kwargs)


def _reference_backward(xp, *args, block=None, **kwargs):
    return window_attention_backward(xp, *args, **kwargs)


WINDOW_REFERENCE = window_adapter(
    Kernel(_reference_forward, _reference_backward, dtypes=None), takes_xp=True
)


# -- SASA -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SasaOptions(Options):
    num_heads: int
    kernel_size: int
    dilation: int
    boundary: str
    scale: float
    biases: tuple[str, ...]  # the bias keys given in params, sorted


SASA_WEIGHTS = ("w_q", "w_k", "w_v")
SASA_BIASES = ("b_q", "b_k", "b_v")
SASA_RESIDUALS = ("x", *SASA_WEIGHTS, "attn")


def _to_heads(xp, y, n, h, w, heads):
    """(N·H·W, C) channel rows -> (N, heads, H, W, dh)."""
    c = y.shape[-1]
    return xp.permute_dims(xp.reshape(y, (n, h, w, heads, c // heads)), (0, 3, 1, 2, 4))


def _from_heads(xp, y):
    """(N, heads, H, W, dh) -> (N·H·W, heads·dh)."""
    n, heads, h, w, dh = y.shape
    return xp.reshape(xp.permute_dims(y, (0, 2, 3, 1, 4)), (n * h * w, heads * dh))


def _sasa_fwd(xp, arrays, options, save, *, ops):
    x, p = arrays["x"], arrays["params"]
    n, c, h, w = x.shape
    heads = options.num_heads
    cdt = compute_dtype(xp, x.dtype)
    rows = xp.reshape(xp.permute_dims(xp.astype(x, cdt, copy=False), (0, 2, 3, 1)), (n * h * w, c))
    proj = []
    for wn, bn in zip(SASA_WEIGHTS, SASA_BIASES, strict=True):
        wt = xp.astype(xp.reshape(p[wn], (p[wn].shape[0], c)), cdt, copy=False)
        y = xp.matmul(rows, xp.matrix_transpose(wt))
        if bn in p:
            y = y + xp.astype(p[bn], cdt, copy=False)
        proj.append(_to_heads(xp, xp.astype(y, x.dtype), n, h, w, heads))
    q, k, v = proj
    rel = {key: p[name] for key, name in (("r_h", "rel_h"), ("r_w", "rel_w")) if name in p}
    kwargs = {
        "kernel_size": options.kernel_size,
        "dilation": options.dilation,
        "boundary": options.boundary,
        "scale": options.scale,
        "rel_pos": rel or None,
    }
    if save:
        o, res = ops.neighborhood_attention_2d.fwd(q, k, v, **kwargs)
    else:
        o, res = ops.neighborhood_attention_2d(q, k, v, **kwargs), None
    dv = o.shape[-1]
    out = xp.reshape(xp.permute_dims(o, (0, 1, 4, 2, 3)), (n, heads * dv, h, w))
    saved = {"x": x, **{wn: p[wn] for wn in SASA_WEIGHTS}, "attn": res} if save else {}
    return (out,), saved


def _sasa_bwd(xp, saved, options, cotangents, *, ops):
    (dy,) = cotangents
    x = saved["x"]
    n, c, h, w = x.shape
    heads = options.num_heads
    dtype = x.dtype
    cdt = compute_dtype(xp, dtype)
    res = saved["attn"]
    dvh = dy.shape[1] // heads
    d_o = xp.permute_dims(xp.reshape(dy, (n, heads, dvh, h, w)), (0, 1, 3, 4, 2))
    g = ops.neighborhood_attention_2d.bwd(res, d_o)
    rows = xp.reshape(xp.permute_dims(xp.astype(x, cdt, copy=False), (0, 2, 3, 1)), (n * h * w, c))
    dx_rows = None
    grads = {}
    for wn, bn, gp in zip(SASA_WEIGHTS, SASA_BIASES, (g.q, g.k, g.v), strict=True):
        gy = xp.astype(_from_heads(xp, gp), cdt, copy=False)  # (NHW, C_out)
        wt = saved[wn]
        w2 = xp.astype(xp.reshape(wt, (wt.shape[0], c)), cdt, copy=False)
        term = xp.matmul(gy, w2)
        dx_rows = term if dx_rows is None else dx_rows + term
        grads[wn] = xp.astype(xp.reshape(xp.matmul(xp.matrix_transpose(gy), rows), wt.shape), dtype)
        if bn in options.biases:
            grads[bn] = xp.astype(xp.sum(gy, axis=0), dtype)
    if g.rel_pos is not None:
        for key, name in (("r_h", "rel_h"), ("r_w", "rel_w")):
            if key in g.rel_pos:
                grads[name] = g.rel_pos[key]
    dx = xp.permute_dims(xp.reshape(dx_rows, (n, h, w, c)), (0, 3, 1, 2))
    return {"x": xp.astype(dx, dtype), "params": grads}


SASA_REFERENCE = Kernel(_sasa_fwd, _sasa_bwd, dtypes=None, uses=("neighborhood_attention_2d",))

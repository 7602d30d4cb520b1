"""Local self-attention on images and sequences: the public ops.

Neighbourhood attention (NATTEN's clamped windows, SASA's zero-padded windows, masked windows),
HaloNet's blocked attention, and the SASA layer built from them. All of them are one separable
window attention (:mod:`arrayattn._reference.neighborhood`) with different window tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import _checks as checks
from ._glue.neighborhood import (
    SASA_BIASES,
    SASA_REFERENCE,
    SASA_RESIDUALS,
    SASA_WEIGHTS,
    WINDOW_REFERENCE,
    WINDOW_RESIDUALS,
    HaloOptions,
    NaOptions,
    SasaOptions,
    window_adapter,
)
from ._kernel import Call
from ._op import op
from ._xp import Array, device_of

__all__ = [
    "halo_attention",
    "neighborhood_attention_1d",
    "neighborhood_attention_2d",
    "sasa_block",
    "sasa_relative_tables",
]

_BOUNDARIES = ("clamp", "zero", "mask")


# -- windows of a call ----------------------------------------------------------------------------


# -- the shared reference kernel ------------------------------------------------------------------
#
# Every op below runs on (..., H, W, d) arrays; the 1-D op views (..., L, d) as (..., 1, L, d)
# and its (..., 2K-1) bias as (..., 1, 2K-1).


# -- validation -----------------------------------------------------------------------------------


def _check_qkv(xp, q, k, v, spatial: int, legend: str):
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(xp, name, x)
        checks.check_ndim(
            name, x, spatial + 1, legend.replace("d)", "dv)") if name == "v" else legend
        )
    checks.check_same_dtype(q=q, k=k, v=v)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(
            f"v: expected shape {tuple(q.shape[:-1]) + ('dv',)} (from q), got {tuple(v.shape)}"
        )


def _scale(scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    return checks.check_real("scale", scale)


def _check_table(xp, name, table, batch, rows, d, dtype):
    checks.namespace(**{name: table})
    checks.check_floating(xp, name, table)
    if table.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of q), got {table.dtype}")
    if table.ndim < 2 or tuple(table.shape[-2:]) != (rows, d):
        raise ValueError(f"{name}: expected shape (..., {rows}, {d}), got {tuple(table.shape)}")
    checks.check_broadcastable(name, table.shape, tuple(batch) + (rows, d), "(..., T, d)")


def _normalise_rel_pos(xp, rel_pos, batch, rows, d, dtype, allowed_rows=None):
    """(arrays entry, static form, keys) for a rel_pos tuple (r_h, r_w) or mapping."""
    if rel_pos is None:
        return None, None, ()
    if isinstance(rel_pos, Mapping):
        unknown = sorted(set(rel_pos) - {"r_h", "r_w"})
        if unknown:
            raise ValueError(f"rel_pos: unknown keys {unknown}; expected 'r_h' and/or 'r_w'")
        entries, form = {key: rel_pos.get(key) for key in ("r_h", "r_w")}, "dict"
    elif isinstance(rel_pos, (tuple, list)) and len(rel_pos) == 2:
        entries, form = {"r_h": rel_pos[0], "r_w": rel_pos[1]}, "tuple"
    else:
        raise TypeError(
            f"rel_pos: expected a pair (r_h, r_w) or a mapping with keys 'r_h', 'r_w', "
            f"got {type(rel_pos).__name__}"
        )
    keys = tuple(key for key, t in entries.items() if t is not None)
    if not keys:
        return None, None, ()
    for key in keys:
        t = entries[key]
        if not hasattr(t, "shape"):
            raise TypeError(f"rel_pos[{key!r}]: expected an array, got {type(t).__name__}")
        n = rows if allowed_rows is None else allowed_rows(key, t)
        _check_table(xp, f"rel_pos[{key!r}]", t, batch, n, d, dtype)
    return {key: entries[key] for key in keys}, form, keys


# -- neighbourhood attention ----------------------------------------------------------------------


def _na_examples_2d(rng):
    q = rng.standard_normal((2, 5, 6, 3))
    k = rng.standard_normal((2, 5, 6, 3))
    v = rng.standard_normal((2, 5, 6, 4))
    bias = rng.standard_normal((2, 5, 5))
    rel = {"r_h": rng.standard_normal((5, 3)) / 2, "r_w": rng.standard_normal((5, 3)) / 2}
    return [
        ((q, k, v), {"kernel_size": 3, "rel_bias": bias}),
        ((q, k, v), {"kernel_size": 3, "boundary": "zero", "rel_pos": rel, "rel_bias": bias}),
        ((q, k, v), {"kernel_size": 2, "dilation": 2, "boundary": "clamp"}),
        ((q, k, v), {"kernel_size": 3, "dilation": 2, "boundary": "mask", "rel_pos": rel}),
    ]


@op(
    differentiable=("q", "k", "v", "rel_bias", "rel_pos"),
    reference=WINDOW_REFERENCE,
    residuals=WINDOW_RESIDUALS,
    adapt=window_adapter,
    examples=_na_examples_2d,
)
def neighborhood_attention_2d(
    q: Array,
    k: Array,
    v: Array,
    *,
    kernel_size: int,
    dilation: int = 1,
    boundary: str = "clamp",
    rel_bias: Array | None = None,
    rel_pos: Any = None,
    scale: float | None = None,
) -> Call[Array]:
    r"""2-D neighbourhood attention: each pixel attends to a ``K×K`` window of keys around it.

    Logit of query ``p`` and key ``n`` at offset ``(dy, dx) = n - p``::

        scale·q_p·k_n + q_p·(r_h[dy/dil + K-1] + r_w[dx/dil + K-1])
                      + rel_bias[..., dy/dil + K-1, dx/dil + K-1]

    softmax over the window, output ``Σ P v``. Covers Neighbourhood Attention (NATTEN, with its
    relative positional bias and DiNAT dilation) and Stand-Alone Self-Attention (SASA, with its
    relative embeddings, via ``boundary='zero'``). Windows are computed by index arithmetic: no
    ``HW×HW`` mask and (on the numba backend) no unfolded copy of keys or values.

    Parameters
    ----------
    q, k : array, shape (..., H, W, d)
        Queries and keys, channel-last; leading dimensions are batch and heads.
    v : array, shape (..., H, W, dv)
        Values.
    kernel_size : int
        ``K``, the window side (odd or even; even ``K`` has ``K//2`` keys before the query and
        ``K//2 - 1`` after, NATTEN's convention).
    dilation : int, default 1
        Keys are ``dilation`` pixels apart (DiNAT).
    boundary : {'clamp', 'zero', 'mask'}, default 'clamp'
        ``'clamp'``: NATTEN — the window is shifted inward at the borders, so every query sees
        exactly ``K×K`` in-image keys (needs ``H, W >= K·dilation``; with dilation NATTEN's rule
        within each residue class ``i mod dilation``). ``'zero'``: SASA/timm — centred window,
        out-of-image keys and values are zero vectors that still take part in the softmax (their
        logit is the relative term alone). ``'mask'``: centred window, out-of-image keys excluded.
    rel_bias : array, optional
        NATTEN's relative positional bias, a scalar per head and offset: shape
        ``(..., 2K-1, 2K-1)`` with leading dimensions broadcastable to ``q.shape[:-3]``. Added
        after the scale (as NATTEN's module does).
    rel_pos : pair (r_h, r_w) or mapping {'r_h', 'r_w'}, optional
        SASA's relative embeddings, each ``(..., 2K-1, d)`` (leading dimensions broadcastable to
        ``q.shape[:-3]``); either may be ``None``. Not scaled. :func:`sasa_relative_tables`
        builds them from the SASA paper's row/column halves. Gradients come back in the same form.
    scale : float, optional
        ``None`` means ``1/sqrt(d)`` (timm and NATTEN; the SASA paper has no scale: pass 1.0).

    Returns
    -------
    out : array, shape (..., H, W, dv)
        In the dtype of ``q``.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``H``/``W`` image height and width, ``d``
    query/key width, ``dv`` value width, ``K`` kernel size, ``dil`` dilation. Table row
    ``t = offset/dil + K - 1`` in ``[0, 2K-2]``; centred windows read only rows
    ``K-1-K//2 .. 2K-2-K//2``. ``.bwd`` gives gradients for ``q``, ``k``, ``v``, ``rel_bias``
    and ``rel_pos``; keys and values reached from several queries accumulate (scatter-add over
    the inverse neighbourhood), and gradients reaching zero-padded keys are discarded. The
    derivation is on the page *Neighbourhood and halo attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 8, 8, 4)) for _ in range(3))  # (N, heads, H, W, d)
    >>> bias = np.zeros((2, 5, 5))                                          # (heads, 2K-1, 2K-1)
    >>> out, res = aa.neighborhood_attention_2d.fwd(q, k, v, kernel_size=3, rel_bias=bias)
    >>> g = aa.neighborhood_attention_2d.bwd(res, np.ones_like(out))
    >>> out.shape, g.rel_bias.shape, g.rel_pos
    ((1, 2, 8, 8, 4), (2, 5, 5), None)
    """
    if isinstance(rel_pos, Mapping):
        rel_arrays = {f"rel_pos[{key!r}]": a for key, a in rel_pos.items()}
    elif isinstance(rel_pos, (tuple, list)):
        rel_arrays = {f"rel_pos[{i}]": a for i, a in enumerate(rel_pos)}
    else:
        rel_arrays = {}
    xp = checks.namespace(q=q, k=k, v=v, rel_bias=rel_bias, **rel_arrays)
    _check_qkv(xp, q, k, v, 2, "(..., H, W, d)")
    kernel = checks.check_int("kernel_size", kernel_size, minimum=1)
    dil = checks.check_int("dilation", dilation, minimum=1)
    checks.check_choice("boundary", boundary, _BOUNDARIES)
    h, w, d = q.shape[-3], q.shape[-2], q.shape[-1]
    if boundary == "clamp" and (h < kernel * dil or w < kernel * dil):
        raise ValueError(
            f"q: boundary='clamp' needs an image at least kernel_size·dilation = {kernel * dil} "
            f"along each axis (NATTEN), got (H, W) = ({h}, {w}); use boundary='zero' or 'mask'"
        )
    batch = tuple(q.shape[:-3])
    t = 2 * kernel - 1
    if rel_bias is not None:
        checks.check_floating(xp, "rel_bias", rel_bias)
        checks.check_same_dtype(q=q, rel_bias=rel_bias)
        if rel_bias.ndim < 2 or tuple(rel_bias.shape[-2:]) != (t, t):
            raise ValueError(
                f"rel_bias: expected shape (..., 2K-1, 2K-1) = (..., {t}, {t}), "
                f"got {tuple(rel_bias.shape)}"
            )
        checks.check_broadcastable("rel_bias", rel_bias.shape, batch + (t, t), "(..., 2K-1, 2K-1)")
    rel, form, keys = _normalise_rel_pos(xp, rel_pos, batch, t, d, q.dtype)
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "rel_bias": rel_bias, "rel_pos": rel},
        NaOptions(
            one_d=False,
            kernel_size=kernel,
            dilation=dil,
            boundary=boundary,
            causal=False,
            scale=_scale(scale, d),
            rel_pos_form=form,
            rel_keys=keys,
        ),
    )


def _na_examples_1d(rng):
    q = rng.standard_normal((2, 3, 9, 4))
    k = rng.standard_normal((2, 3, 9, 4))
    v = rng.standard_normal((2, 3, 9, 5))
    bias = rng.standard_normal((3, 7))
    return [
        ((q, k, v), {"kernel_size": 4, "rel_bias": bias}),
        ((q, k, v), {"kernel_size": 3, "dilation": 3, "rel_bias": bias[:, 1:6]}),
        ((q, k, v), {"kernel_size": 4, "causal": True, "boundary": "zero", "rel_bias": bias}),
        ((q, k, v), {"kernel_size": 3, "dilation": 2, "boundary": "mask"}),
    ]


@op(
    differentiable=("q", "k", "v", "rel_bias"),
    reference=WINDOW_REFERENCE,
    residuals=WINDOW_RESIDUALS,
    adapt=window_adapter,
    examples=_na_examples_1d,
)
def neighborhood_attention_1d(
    q: Array,
    k: Array,
    v: Array,
    *,
    kernel_size: int,
    dilation: int = 1,
    causal: bool = False,
    boundary: str = "clamp",
    rel_bias: Array | None = None,
    scale: float | None = None,
) -> Call[Array]:
    r"""1-D neighbourhood attention: each position attends to a window of ``K`` keys.

    Logit of query ``i`` and key ``n``: ``scale·q_i·k_n + rel_bias[..., (n-i)/dil + K-1]``;
    softmax over the window. The windows are those of :func:`neighborhood_attention_2d` along
    one axis.

    Parameters
    ----------
    q, k : array, shape (..., L, d)
        Queries and keys; leading dimensions are batch and heads.
    v : array, shape (..., L, dv)
        Values.
    kernel_size : int
        ``K`` (odd or even; even ``K`` has ``K//2`` keys before the query, ``K//2 - 1`` after).
    dilation : int, default 1
        Keys are ``dilation`` positions apart.
    causal : bool, default False
        Query ``i`` sees keys ``i - m·dil`` for ``m = 0..K-1`` (NATTEN's causal window: near the
        start it is not shifted; with ``'clamp'`` or ``'mask'`` the keys before position 0 are
        excluded, with ``'zero'`` they are zero vectors in the softmax).
    boundary : {'clamp', 'zero', 'mask'}, default 'clamp'
        As in :func:`neighborhood_attention_2d`; ``'clamp'`` needs ``L >= K·dilation``.
    rel_bias : array, optional
        Shape ``(..., 2K-1)``, leading dimensions broadcastable to ``q.shape[:-2]``; added after
        the scale.
    scale : float, optional
        ``None`` means ``1/sqrt(d)``.

    Returns
    -------
    out : array, shape (..., L, dv)

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``L`` sequence length, ``d`` query/key
    width, ``dv`` value width, ``K`` kernel size. ``.bwd`` gives gradients for ``q``, ``k``,
    ``v`` and ``rel_bias``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 16, 8)) for _ in range(3))     # (heads, L, d)
    >>> out = aa.neighborhood_attention_1d(q, k, v, kernel_size=5, causal=True)
    >>> out.shape
    (2, 16, 8)
    """
    xp = checks.namespace(q=q, k=k, v=v, rel_bias=rel_bias)
    _check_qkv(xp, q, k, v, 1, "(..., L, d)")
    kernel = checks.check_int("kernel_size", kernel_size, minimum=1)
    dil = checks.check_int("dilation", dilation, minimum=1)
    checks.check_choice("boundary", boundary, _BOUNDARIES)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    length, d = q.shape[-2], q.shape[-1]
    if boundary == "clamp" and not causal and length < kernel * dil:
        raise ValueError(
            f"q: boundary='clamp' needs a sequence at least kernel_size·dilation = "
            f"{kernel * dil} long (NATTEN), got L = {length}; use boundary='zero' or 'mask'"
        )
    t = 2 * kernel - 1
    if rel_bias is not None:
        checks.check_floating(xp, "rel_bias", rel_bias)
        checks.check_same_dtype(q=q, rel_bias=rel_bias)
        if rel_bias.ndim < 1 or rel_bias.shape[-1] != t:
            raise ValueError(
                f"rel_bias: expected shape (..., 2K-1) = (..., {t}), got {tuple(rel_bias.shape)}"
            )
        checks.check_broadcastable(
            "rel_bias", rel_bias.shape, tuple(q.shape[:-2]) + (t,), "(..., 2K-1)"
        )
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "rel_bias": rel_bias, "rel_pos": None},
        NaOptions(
            one_d=True,
            kernel_size=kernel,
            dilation=dil,
            boundary=boundary,
            causal=causal,
            scale=_scale(scale, d),
            rel_pos_form=None,
            rel_keys=(),
        ),
    )


# -- HaloNet --------------------------------------------------------------------------------------


def _halo_examples(rng):
    q = rng.standard_normal((2, 4, 6, 3))
    k = rng.standard_normal((2, 4, 6, 3))
    v = rng.standard_normal((2, 4, 6, 2))
    compact = {"r_h": rng.standard_normal((5, 3)) / 2, "r_w": rng.standard_normal((5, 3)) / 2}
    timm = {"r_h": rng.standard_normal((7, 3)) / 2, "r_w": rng.standard_normal((7, 3)) / 2}
    return [
        ((q, k, v), {"block_size": 2, "halo_size": 1, "rel_pos": compact}),
        ((q, k, v), {"block_size": 2, "halo_size": 1, "rel_pos": timm}),
        ((q, k, v), {"block_size": 1, "halo_size": 2}),
    ]


@op(
    differentiable=("q", "k", "v", "rel_pos"),
    reference=WINDOW_REFERENCE,
    residuals=WINDOW_RESIDUALS,
    adapt=window_adapter,
    examples=_halo_examples,
)
def halo_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_size: int,
    halo_size: int,
    rel_pos: Any = None,
    scale: float | None = None,
) -> Call[Array]:
    r"""HaloNet blocked local self-attention (timm ``HaloAttn`` semantics).

    The image is cut into ``b×b`` query blocks; every query of block ``(I, J)`` attends to the
    ``(b+2h)×(b+2h)`` window of keys around its block (rows ``I·b-h .. I·b+b+h-1``, likewise
    columns). Keys and values are zero-padded by ``h``; padded keys are **not** masked (their logit
    is the relative term alone), as in timm. Logit::

        scale·q·k + q·(r_h[dy + o] + r_w[dx + o])

    with ``(dy, dx)`` = key minus query absolute positions and origin ``o = b+h-1`` for the
    compact tables of ``2(b+h)-1`` rows, or ``o = b+3h-1`` for timm's tables of ``2(b+2h)-1``
    rows (``PosEmbedRel``; their first ``2h`` rows are never read and get zero gradient).

    Parameters
    ----------
    q, k : array, shape (..., H, W, d)
        Queries and keys, channel-last.
    v : array, shape (..., H, W, dv)
        Values.
    block_size : int
        ``b``; must divide ``H`` and ``W``.
    halo_size : int
        ``h >= 0``.
    rel_pos : pair (r_h, r_w) or mapping {'r_h', 'r_w'}, optional
        Relative tables, each ``(..., 2(b+h)-1, d)`` or ``(..., 2(b+2h)-1, d)``; leading
        dimensions broadcastable to ``q.shape[:-3]`` (timm shares one pair across heads).
    scale : float, optional
        ``None`` means ``1/sqrt(d)`` (timm's ``dim_head ** -0.5``); the relative term is not
        scaled (timm's default ``scale_pos_embed=False``).

    Returns
    -------
    out : array, shape (..., H, W, dv)

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``H``/``W`` image size, ``d``/``dv`` widths,
    ``b`` block size, ``h`` halo. With ``block_size=1`` this is SASA: neighbourhood attention
    with ``boundary='zero'`` and ``K = 2h+1`` (tables shifted by ``h`` rows). The backward
    overlap-adds the key/value gradients of overlapping windows and discards those of the
    padding.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 8, 8, 4)) for _ in range(3))
    >>> rel = (np.zeros((9, 4)), np.zeros((9, 4)))                       # 2(b+h)-1 rows
    >>> out, res = aa.halo_attention.fwd(q, k, v, block_size=4, halo_size=1, rel_pos=rel)
    >>> g = aa.halo_attention.bwd(res, np.ones_like(out))
    >>> out.shape, g.rel_pos[0].shape
    ((2, 8, 8, 4), (9, 4))
    """
    if isinstance(rel_pos, Mapping):
        rel_arrays = {f"rel_pos[{key!r}]": a for key, a in rel_pos.items()}
    elif isinstance(rel_pos, (tuple, list)):
        rel_arrays = {f"rel_pos[{i}]": a for i, a in enumerate(rel_pos)}
    else:
        rel_arrays = {}
    xp = checks.namespace(q=q, k=k, v=v, **rel_arrays)
    _check_qkv(xp, q, k, v, 2, "(..., H, W, d)")
    b = checks.check_int("block_size", block_size, minimum=1)
    h = checks.check_int("halo_size", halo_size, minimum=0)
    height, width, d = q.shape[-3], q.shape[-2], q.shape[-1]
    if height % b or width % b:
        raise ValueError(
            f"block_size: expected a divisor of the image size (H, W) = ({height}, {width}), got "
            f"{b}"
        )
    compact, timm = 2 * (b + h) - 1, 2 * (b + 2 * h) - 1

    def rows_of(key, t):  # numpydoc ignore=GL08
        n = t.shape[-2] if t.ndim >= 2 else -1
        if n not in (compact, timm):
            raise ValueError(
                f"rel_pos[{key!r}]: expected shape (..., {compact}, {d}) (2(b+h)-1 rows) or "
                f"(..., {timm}, {d}) (timm, 2(b+2h)-1 rows), got {tuple(t.shape)}"
            )
        return n

    rel, form, keys = _normalise_rel_pos(
        xp, rel_pos, tuple(q.shape[:-3]), compact, d, q.dtype, rows_of
    )
    rows = {
        key: (compact if rel is None or key not in rel else rel[key].shape[-2])
        for key in ("r_h", "r_w")
    }
    return Call(
        xp,
        {"q": q, "k": k, "v": v, "rel_bias": None, "rel_pos": rel},
        HaloOptions(
            block_size=b,
            halo_size=h,
            tables=(rows["r_h"], rows["r_w"]),
            scale=_scale(scale, d),
            rel_pos_form=form,
            rel_keys=keys,
        ),
    )


# -- SASA ------------------------------------------------------------------------------------------


def sasa_relative_tables(r_row: Array, r_col: Array, *, kernel_size: int | None = None):
    """The SASA paper's split relative embeddings as the pair ``(r_h, r_w)`` of full-width tables.

    SASA (Ramachandran et al. 2019, §2.2) adds ``q·concat(r_row[dy], r_col[dx])`` with
    ``r_row``, ``r_col`` each half the query width. That equals ``q·r_h[dy] + q·r_w[dx]`` with
    ``r_h = [r_row, 0]`` and ``r_w = [0, r_col]`` zero-padded along the channels, which this
    builds in the ``(2K-1)``-row layout of :func:`neighborhood_attention_2d` (the ``K`` SASA
    offsets ``-K//2 .. K-1-K//2`` fill rows ``K-1-K//2 .. 2K-2-K//2``; the other rows are zero).
    The adjoint (for training ``r_row``, ``r_col``) is the slice back: ``dr_row =
    dr_h[..., rows, :d_row]``, ``dr_col = dr_w[..., rows, d_row:]``.

    Parameters
    ----------
    r_row : array, shape (..., K, d_row)
        Row-offset embeddings (offsets ``-K//2 .. K-1-K//2``), or already ``(..., 2K-1, d_row)``
        when ``kernel_size`` is given and the table has ``2K-1`` rows.
    r_col : array, shape (..., K, d_col)
        Column-offset embeddings, same leading shape; ``d = d_row + d_col``.
    kernel_size : int, optional
        ``K``; inferred from ``r_row`` (``K`` rows) when omitted.

    Returns
    -------
    r_h, r_w : array, shape (..., 2K-1, d_row + d_col)

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> r_h, r_w = aa.sasa_relative_tables(np.ones((3, 2)), np.ones((3, 2)))
    >>> r_h.shape, r_h[2].tolist(), r_w[2].tolist(), r_h[0].tolist()
    ((5, 4), [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    """
    xp = checks.namespace(r_row=r_row, r_col=r_col)
    checks.check_floating(xp, "r_row", r_row)
    checks.check_same_dtype(r_row=r_row, r_col=r_col)
    checks.check_ndim("r_row", r_row, 2, "(..., K, d_row)")
    checks.check_ndim("r_col", r_col, 2, "(..., K, d_col)")
    n = r_row.shape[-2]
    kernel = n if kernel_size is None else checks.check_int("kernel_size", kernel_size, minimum=1)
    if n not in (kernel, 2 * kernel - 1):
        raise ValueError(
            f"r_row: expected {kernel} or {2 * kernel - 1} rows, got {tuple(r_row.shape)}"
        )
    if r_col.shape[-2] != n or tuple(r_col.shape[:-2]) != tuple(r_row.shape[:-2]):
        raise ValueError(
            f"r_col: expected shape {tuple(r_row.shape[:-1])} + (d_col,) like r_row, "
            f"got {tuple(r_col.shape)}"
        )
    lead = tuple(r_row.shape[:-2])
    dr, dc = r_row.shape[-1], r_col.shape[-1]

    def pad(t, before, after, ch_before, ch_after):  # numpydoc ignore=GL08
        dev = device_of(t)
        parts = []
        width = t.shape[-1] + ch_before + ch_after
        if ch_before:
            t = xp.concat(
                [xp.zeros(lead + (t.shape[-2], ch_before), dtype=t.dtype, device=dev), t], axis=-1
            )
        if ch_after:
            t = xp.concat(
                [t, xp.zeros(lead + (t.shape[-2], ch_after), dtype=t.dtype, device=dev)], axis=-1
            )
        if before:
            parts.append(xp.zeros(lead + (before, width), dtype=t.dtype, device=dev))
        parts.append(t)
        if after:
            parts.append(xp.zeros(lead + (after, width), dtype=t.dtype, device=dev))
        return xp.concat(parts, axis=-2) if len(parts) > 1 else t

    before = 0 if n == 2 * kernel - 1 else kernel - 1 - kernel // 2
    after = 0 if n == 2 * kernel - 1 else kernel - 1 - before
    return pad(r_row, before, after, 0, dc), pad(r_col, before, after, dr, 0)


def _sasa_examples(rng):
    c, cout, heads, kernel = 3, 4, 2, 3
    params = {f"w_{s}": rng.standard_normal((cout, c, 1, 1)) / 2 for s in "qkv"}
    params["b_k"] = rng.standard_normal(cout) / 2
    params["rel_h"] = rng.standard_normal((2 * kernel - 1, cout // heads)) / 2
    params["rel_w"] = rng.standard_normal((heads, 2 * kernel - 1, cout // heads)) / 2
    x = rng.standard_normal((2, c, 4, 5))
    return [((x, params), {"num_heads": heads, "kernel_size": kernel})]


@op(
    differentiable=("x", "params"),
    reference=SASA_REFERENCE,
    residuals=SASA_RESIDUALS,
    examples=_sasa_examples,
)
def sasa_block(
    x: Array,
    params: Mapping[str, Array],
    *,
    num_heads: int,
    kernel_size: int,
    dilation: int = 1,
    boundary: str = "zero",
    scale: float | None = None,
) -> Call[Array]:
    r"""The Stand-Alone Self-Attention layer (SASA, Ramachandran et al. 2019 §2.2) on an image.

    Replaces a ``K×K`` convolution: ``q, k, v`` are 1×1 convolutions of ``x`` (a matrix product
    over the channels), split into ``num_heads`` channel groups, and every pixel attends to the
    ``K×K`` neighbourhood around it through :func:`neighborhood_attention_2d` (SASA's zero
    padding by default; the attention core runs on the active backend)::

        y[:, head] = softmax_window(scale·q·k + q·(r_h[dy] + r_w[dx])) v

    Parameters
    ----------
    x : array, shape (N, C, H, W)
        Input feature map (NCHW).
    params : mapping of str to array
        PyTorch ``Conv2d`` layout: ``w_q``, ``w_k`` (Cqk, C, 1, 1), ``w_v`` (Cv, C, 1, 1);
        optional biases ``b_q``, ``b_k`` (Cqk,), ``b_v`` (Cv,) (the paper has none); optional
        relative embeddings ``rel_h``, ``rel_w`` of shape (2K-1, dh) (shared by the heads) or
        (num_heads, 2K-1, dh) — see :func:`sasa_relative_tables` for the paper's split halves.
    num_heads : int
        Must divide Cqk and Cv; ``dh = Cqk / num_heads``.
    kernel_size : int
        ``K``, odd (SASA's neighbourhood ``|a - i| <= K//2`` is symmetric).
    dilation : int, default 1
    boundary : {'zero', 'mask', 'clamp'}, default 'zero'
        As in :func:`neighborhood_attention_2d`; ``'zero'`` is SASA with zero padding applied
        after the projections (padded keys and values are exactly 0 even with biases).
    scale : float, optional
        ``None`` means ``1/sqrt(dh)`` (timm); the paper's equations have no scale (pass 1.0).

    Returns
    -------
    y : array, shape (N, Cv, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` input channels, ``Cqk``/``Cv`` query-key/value channels,
    ``H``/``W`` image size, ``dh`` per-head query width, ``K`` kernel size. ``.bwd`` gives the
    gradient of ``x`` and of every entry of ``params`` (a dict with the same keys).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> params = {f"w_{s}": rng.standard_normal((8, 4, 1, 1)) / 2 for s in "qkv"}
    >>> params["rel_h"] = params["rel_w"] = np.zeros((5, 4))          # (2K-1, dh)
    >>> x = rng.standard_normal((1, 4, 6, 6))
    >>> y, res = aa.sasa_block.fwd(x, params, num_heads=2, kernel_size=3)
    >>> g = aa.sasa_block.bwd(res, np.ones_like(y))
    >>> y.shape, g.x.shape, sorted(g.params)
    ((1, 8, 6, 6), (1, 4, 6, 6), ['rel_h', 'rel_w', 'w_k', 'w_q', 'w_v'])
    """
    xp = checks.image_block_namespace(x, params)
    heads = checks.check_int("num_heads", num_heads, minimum=1)
    kernel = checks.check_int("kernel_size", kernel_size, minimum=1)
    if kernel % 2 == 0:
        raise ValueError(
            "kernel_size: SASA's neighbourhood is symmetric, expected an odd kernel_size, got "
            f"{kernel}"
            " (neighborhood_attention_2d accepts even sizes)"
        )
    c = x.shape[1]
    for key in SASA_WEIGHTS:
        if params.get(key) is None:
            raise ValueError(f"params: missing required key {key!r}")
        if params[key].ndim != 4:
            raise ValueError(
                f"params['{key}']: expected a Conv2d weight (out, in, 1, 1), got shape "
                f"{tuple(params[key].shape)}"
            )
    cqk, cv = params["w_q"].shape[0], params["w_v"].shape[0]
    for width, key in ((cqk, "w_q"), (cv, "w_v")):
        if width % heads:
            raise ValueError(
                f"params['{key}']: output width {width} is not divisible by num_heads = {heads}"
            )
    dh = cqk // heads
    rel = {key: params[key] for key in ("rel_h", "rel_w") if params.get(key) is not None}
    for key, t in rel.items():
        if tuple(t.shape) not in ((2 * kernel - 1, dh), (heads, 2 * kernel - 1, dh)):
            raise ValueError(
                f"params[{key!r}]: expected shape ({2 * kernel - 1}, {dh}) or "
                f"({heads}, {2 * kernel - 1}, {dh}), got {tuple(t.shape)}"
            )
    clean = checks.check_params(
        {key: a for key, a in params.items() if key not in ("rel_h", "rel_w")},
        {"w_q": (cqk, c, 1, 1), "w_k": (cqk, c, 1, 1), "w_v": (cv, c, 1, 1)},
        {"b_q": (cqk,), "b_k": (cqk,), "b_v": (cv,)},
    )
    clean.update(rel)
    dil = checks.check_int("dilation", dilation, minimum=1)
    checks.check_choice("boundary", boundary, _BOUNDARIES)
    h, w = x.shape[2], x.shape[3]
    if boundary == "clamp" and (h < kernel * dil or w < kernel * dil):
        raise ValueError(
            f"x: boundary='clamp' needs an image at least kernel_size·dilation = {kernel * dil} "
            f"along each axis, got (H, W) = ({h}, {w})"
        )
    return Call(
        xp,
        {"x": x, "params": clean},
        SasaOptions(
            num_heads=heads,
            kernel_size=kernel,
            dilation=dil,
            boundary=boundary,
            scale=_scale(scale, dh),
            biases=tuple(sorted(b for b in SASA_BIASES if b in clean)),
        ),
    )

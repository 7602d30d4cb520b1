"""Channel-attention blocks: squeeze-and-excitation, CBAM, SPANet and attention condensers.

Block-level ops on images ``x (N, C, H, W)`` with a ``params`` mapping in PyTorch layouts; ``.bwd``
returns the gradient of ``x`` and a dict of gradients keyed like ``params``.
"""

from __future__ import annotations

from . import _checks as checks
from ._glue.channel import (
    AC_REFERENCE,
    AC_RESIDUALS,
    CBAM_REFERENCE,
    CBAM_RESIDUALS,
    SE_REFERENCE,
    SE_RESIDUALS,
    SPA_REFERENCE,
    SPA_RESIDUALS,
    CbamOptions,
    CondenserOptions,
    SpaOptions,
)
from ._kernel import Call, NoOptions
from ._op import op
from ._xp import Array

__all__ = ["attention_condenser", "cbam", "spatial_pyramid_attention", "squeeze_excitation"]

_POOL_ORDERS = ("avg_max", "max_avg")
_SELECTIVE = ("additive", "product", "gated_residual")


# -- validation helpers ---------------------------------------------------------------------------


def _start(x, params):
    xp = checks.image_block_namespace(x, params)
    return xp


def _shape_of(params, key: str, ndim: int, legend: str) -> tuple[int, ...]:
    """The shape of a required entry, checking its presence and rank (errors name the key)."""
    a = params.get(key)
    if a is None:
        raise ValueError(f"params: missing required key {key!r}")
    if not hasattr(a, "shape"):
        raise TypeError(f"params[{key!r}]: expected an array, got {type(a).__name__}")
    if len(a.shape) != ndim:
        raise ValueError(f"params[{key!r}]: expected shape {legend}, got {tuple(a.shape)}")
    return tuple(a.shape)


def _mlp_params(params, c_in: int, c_out: int, extra_req=None, extra_opt=None):
    hidden = _shape_of(params, "w1", 2, f"(hidden, {c_in})")[0]
    required = {"w1": (hidden, c_in), "w2": (c_out, hidden), **(extra_req or {})}
    optional = {"b1": (hidden,), "b2": (c_out,), **(extra_opt or {})}
    return checks.check_params(params, required, optional)


def _mlp_example(rng, c_in, hidden, c_out, bias=True):
    p = {
        "w1": rng.standard_normal((hidden, c_in)) / c_in**0.5,
        "w2": rng.standard_normal((c_out, hidden)) / hidden**0.5,
    }
    if bias:
        p.update(b1=rng.standard_normal(hidden) * 0.1, b2=rng.standard_normal(c_out) * 0.1)
    return p


# -- squeeze-and-excitation -----------------------------------------------------------------------


def _se_examples(rng):
    x = rng.standard_normal((2, 6, 4, 5))
    return [
        ((x, _mlp_example(rng, 6, 3, 6)), {}),
        ((x, _mlp_example(rng, 6, 2, 6, bias=False)), {}),
    ]


@op(
    differentiable=("x", "params"),
    reference=SE_REFERENCE,
    residuals=SE_RESIDUALS,
    examples=_se_examples,
)
def squeeze_excitation(x: Array, params: dict[str, Array]) -> Call[Array]:
    r"""Squeeze-and-excitation (Hu et al., CVPR 2018, §3).

    ``z = mean_{h,w} x``, ``s = σ(W2 δ(W1 z + b1) + b2)``, ``y_c = s_c · x_c``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    params : mapping of str to array
        PyTorch ``Linear`` layout: ``w1`` (Cr, C), ``w2`` (C, Cr); optional biases ``b1`` (Cr,),
        ``b2`` (C,). timm's ``SEModule`` stores the same maps as 1×1 convs: pass
        ``fc1.weight.reshape(Cr, C)`` and ``fc2.weight.reshape(C, Cr)``.

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``Cr`` reduced width
    (C/16 in the paper; timm rounds to a multiple of 8). Backward:
    ``ds = Σ_hw dy ⊙ x``, through the MLP, ``dx = dy ⊙ s + dz / HW``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 32, 8, 8), dtype=np.float32)
    >>> p = {"w1": rng.standard_normal((2, 32), dtype=np.float32),
    ...      "w2": rng.standard_normal((32, 2), dtype=np.float32)}
    >>> y, res = aa.squeeze_excitation.fwd(x, p)
    >>> g = aa.squeeze_excitation.bwd(res, np.ones_like(y))
    >>> y.shape, sorted(g.params)
    ((2, 32, 8, 8), ['w1', 'w2'])
    """
    xp = _start(x, params)
    clean = _mlp_params(params, x.shape[1], x.shape[1])
    return Call(xp, {"x": x, "params": clean}, NoOptions())


# -- CBAM -----------------------------------------------------------------------------------------


def _cbam_examples(rng):
    x = rng.standard_normal((2, 6, 5, 4))
    p = _mlp_example(rng, 6, 3, 6)
    p["w_spatial"] = rng.standard_normal((1, 2, 3, 3)) / 3
    p2 = _mlp_example(rng, 6, 2, 6, bias=False)
    p2["w_spatial"] = rng.standard_normal((1, 2, 7, 7)) / 7
    p2["b_spatial"] = rng.standard_normal(1)
    return [((x, p), {}), ((x, p2), {"pool_order": "max_avg"})]


@op(
    differentiable=("x", "params"),
    reference=CBAM_REFERENCE,
    residuals=CBAM_RESIDUALS,
    examples=_cbam_examples,
)
def cbam(x: Array, params: dict[str, Array], *, pool_order: str = "avg_max") -> Call[Array]:
    r"""Convolutional block attention module (Woo et al., ECCV 2018, §3).

    ``M_c = σ(MLP(avg_hw x) + MLP(max_hw x))`` with the shared ``MLP(p) = W2 δ(W1 p + b1) + b2``;
    ``F' = M_c ⊙ x``; ``M_s = σ(conv_{k×k}([avg_c F'; max_c F']) + b_s)`` with zero padding k//2;
    ``y = M_s ⊙ F'``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    params : mapping of str to array
        ``w1`` (Cr, C), ``w2`` (C, Cr) (PyTorch ``Linear`` layout), optional ``b1`` (Cr,),
        ``b2`` (C,); ``w_spatial`` (1, 2, k, k) (``Conv2d`` layout, k odd; 7 in the paper),
        optional ``b_spatial`` (1,).
    pool_order : {'avg_max', 'max_avg'}, default 'avg_max'
        Order of the two channel pools stacked as the spatial conv's input channels:
        ``'avg_max'`` is the paper's ``[AvgPool; MaxPool]`` (and timm's ``CbamModule``);
        ``'max_avg'`` is the official code (``Jongchan/attention-module``, ``ChannelPool``).

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``Cr`` hidden width, ``k``
    spatial kernel. The official code follows the spatial conv with a BatchNorm (no ReLU); it is
    not part of this op: fold an eval-mode BN into ``w_spatial`` / ``b_spatial``
    (``w·γ/√(σ²+ε)``, ``β − μγ/√(σ²+ε)``). Max pools route gradients to the first maximum.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 16, 8, 8))
    >>> p = {"w1": rng.standard_normal((4, 16)), "w2": rng.standard_normal((16, 4)),
    ...      "w_spatial": rng.standard_normal((1, 2, 7, 7))}
    >>> y, res = aa.cbam.fwd(x, p, pool_order="max_avg")
    >>> g = aa.cbam.bwd(res, np.ones_like(y))
    >>> y.shape, sorted(g.params)
    ((2, 16, 8, 8), ['w1', 'w2', 'w_spatial'])
    """
    xp = _start(x, params)
    checks.check_choice("pool_order", pool_order, _POOL_ORDERS)
    k = _shape_of(params, "w_spatial", 4, "(1, 2, k, k)")[-1]
    if k % 2 == 0:
        raise ValueError(
            "params['w_spatial']: expected an odd kernel size k (padding k//2), got "
            f"{params['w_spatial'].shape}"
        )
    c = x.shape[1]
    clean = _mlp_params(params, c, c, {"w_spatial": (1, 2, k, k)}, {"b_spatial": (1,)})
    return Call(xp, {"x": x, "params": clean}, CbamOptions(pool_order=pool_order))


# -- SPANet ---------------------------------------------------------------------------------------


def _spa_examples(rng):
    x = rng.standard_normal((2, 3, 7, 6))
    return [
        ((x, _mlp_example(rng, 21 * 3, 4, 3)), {}),
        ((x, _mlp_example(rng, 10 * 3, 4, 3)), {"levels": (1, 3)}),
    ]


@op(
    differentiable=("x", "params"),
    reference=SPA_REFERENCE,
    residuals=SPA_RESIDUALS,
    examples=_spa_examples,
)
def spatial_pyramid_attention(
    x: Array, params: dict[str, Array], *, levels: tuple[int, ...] = (1, 2, 4)
) -> Call[Array]:
    r"""Spatial pyramid attention (SPANet; Guo et al., ICME 2020): an SE block with a pyramid
    squeeze.

    ``z = concat_l flatten(adaptive_avg_pool2d(x, l))`` over ``levels``, ``s = σ(W2 δ(W1 z + b1)
    + b2)``, ``y = s ⊙ x`` per channel.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    params : mapping of str to array
        ``w1`` (hidden, P·C) with ``P = Σ_l l²`` (21 for the default levels), ``w2`` (C, hidden);
        optional ``b1`` (hidden,), ``b2`` (C,).
    levels : tuple of int, default (1, 2, 4)
        Pyramid output sizes; adaptive pooling uses PyTorch's bin rule (bins overlap when H or W
        is not divisible).

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size. Each level is flattened as
    ``torch.flatten(pooled, 1)`` (channel-major: index ``c·l² + i·l + j``) and the levels are
    concatenated in the order given; the exact layer widths of the paper are unverified.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 8, 8, 8))
    >>> p = {"w1": rng.standard_normal((4, 21 * 8)), "w2": rng.standard_normal((8, 4))}
    >>> aa.spatial_pyramid_attention(x, p).shape
    (2, 8, 8, 8)
    """
    xp = _start(x, params)
    if not isinstance(levels, (tuple, list)) or not levels:
        raise ValueError(f"levels: expected a non-empty tuple of ints, got {levels!r}")
    levels = tuple(checks.check_int("levels", ell, minimum=1) for ell in levels)
    c = x.shape[1]
    clean = _mlp_params(params, sum(ell * ell for ell in levels) * c, c)
    return Call(xp, {"x": x, "params": clean}, SpaOptions(levels=levels))


# -- attention condenser --------------------------------------------------------------------------


def _ac_params(rng, c=4, ce=4, ce2=3, groups=2, k=3, scale_shape=()):
    return {
        "w_embed": rng.standard_normal((ce, c // groups, k, k)) / k,
        "b_embed": rng.standard_normal(ce) * 0.1,
        "w_point": rng.standard_normal((ce2, ce, 1, 1)) / 2,
        "w_expand": rng.standard_normal((c, ce2, 1, 1)) / 2,
        "b_expand": rng.standard_normal(c) * 0.1,
        "scale": rng.standard_normal(scale_shape),
    }


def _ac_examples(rng):
    x = rng.standard_normal((2, 4, 6, 5))
    return [
        ((x, _ac_params(rng)), {"pool_size": 2}),
        ((x, _ac_params(rng, scale_shape=(4,))), {"pool_size": 2, "selective": "product"}),
        ((x, _ac_params(rng, groups=4, k=1)), {"pool_size": 3, "selective": "gated_residual"}),
    ]


@op(
    differentiable=("x", "params"),
    reference=AC_REFERENCE,
    residuals=AC_RESIDUALS,
    examples=_ac_examples,
)
def attention_condenser(
    x: Array, params: dict[str, Array], *, pool_size: int, selective: str = "additive"
) -> Call[Array]:
    r"""Attention condenser (Wong et al., TinySpeech / AttendNets) (derivation:
    docs/derivations/channel.rst).

    ``Q = C(V)``: max pooling, window and stride ``pool_size``; ``K = E(Q)``: grouped k×k conv
    (zero padding k//2) + ReLU, pointwise conv + ReLU; ``A = X(K)``: 1×1 expand conv to C channels
    and nearest upsampling back to (H, W); ``V' = F(V, A, S)`` with the learned scale ``S``:

    - ``'additive'`` (default): ``V' = S·V + A``;
    - ``'product'``: ``V' = V ⊙ σ(A) · S``;
    - ``'gated_residual'``: ``V' = V + V ⊙ σ(A) · S``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
        V.
    params : mapping of str to array
        ``w_embed`` (Ce, C/g, k, k) (``g = C / w_embed.shape[1]`` groups, k odd), optional
        ``b_embed`` (Ce,); ``w_point`` (Ce2, Ce, 1, 1), optional ``b_point`` (Ce2,);
        ``w_expand`` (C, Ce2, 1, 1), optional ``b_expand`` (C,); ``scale`` S, shape () or (C,).
    pool_size : int
        Condensation factor s (max-pool window and stride, floor mode).
    selective : {'additive', 'product', 'gated_residual'}, default 'additive'
        The selective-attention function F (see Notes).

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``Ce, Ce2`` embedding
    widths, ``g`` groups, ``k`` embedding kernel, ``s = pool_size``. No official code exists and
    the reimplementations disagree on F (a documented decision). The default ``'additive'`` is
    the only form consistent with the paper's statement that V' → A as S → 0; ``'gated_residual'``
    (identity as S → 0) follows the public ``AkshathRaghav/tinyspeech`` reimplementation and
    ``'product'`` the purely multiplicative reading. The 1×1 expand conv is applied before the
    upsampling, which is exactly equivalent for nearest upsampling and s² times cheaper.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 8, 8, 8))
    >>> p = {"w_embed": rng.standard_normal((8, 2, 3, 3)),
    ...      "w_point": rng.standard_normal((4, 8, 1, 1)),
    ...      "w_expand": rng.standard_normal((8, 4, 1, 1)), "scale": np.array(0.5)}
    >>> y, res = aa.attention_condenser.fwd(x, p, pool_size=2, selective="gated_residual")
    >>> g = aa.attention_condenser.bwd(res, np.ones_like(y))
    >>> y.shape, g.params["scale"].shape
    ((1, 8, 8, 8), ())
    """
    xp = _start(x, params)
    checks.check_choice("selective", selective, _SELECTIVE)
    s = checks.check_int("pool_size", pool_size, minimum=1)
    n, c, h, w = x.shape
    if h < s or w < s:
        raise ValueError(f"pool_size: expected at most the spatial size {(h, w)} of x, got {s}")
    ce, cg, k, k2 = _shape_of(params, "w_embed", 4, "(Ce, C/g, k, k)")
    if cg == 0 or c % cg or k != k2 or k % 2 == 0 or ce % (c // cg):
        raise ValueError(
            f"params['w_embed']: expected shape (Ce, C/g, k, k) with g dividing C = {c} and Ce, "
            f"k odd, got {tuple(params['w_embed'].shape)}"
        )
    ce2 = _shape_of(params, "w_point", 4, "(Ce2, Ce, 1, 1)")[0]
    s_shape = _shape_of(
        params, "scale", len(getattr(params.get("scale"), "shape", ())), "() or (C,)"
    )
    if s_shape not in ((), (c,)):
        raise ValueError(f"params['scale']: expected shape () or ({c},), got {s_shape}")
    clean = checks.check_params(
        params,
        {
            "w_embed": (ce, cg, k, k),
            "w_point": (ce2, ce, 1, 1),
            "w_expand": (c, ce2, 1, 1),
            "scale": s_shape,
        },
        {"b_embed": (ce,), "b_point": (ce2,), "b_expand": (c,)},
    )
    return Call(xp, {"x": x, "params": clean}, CondenserOptions(pool_size=s, selective=selective))

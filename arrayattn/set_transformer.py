"""Set Transformer blocks (Lee et al., ICML 2019): MAB, SAB, ISAB, PMA.

Two variants (a documented decision):

``variant='paper'`` (default), the paper's §3 equations::

    MAB(X, Y) = LN1(H + rFF(H)),  H = LN0(X + Multihead(X, Y, Y)),  Multihead with W^O, scale 1/√d_h

``variant='code'``, ``juho-lee/set_transformer`` ``modules.py`` (commit 6fdae7fb)::

    Q' = fc_q(X), K' = fc_k(Y), V' = fc_v(Y);  O = Q' + concat_j softmax(Q'_j K'_jᵀ/√dim_V) V'_j
    O = ln0(O);  O = O + relu(fc_o(O));  O = ln1(O)          (no W^O, scale over the full width)

Parameters are flat mappings of arrays in PyTorch ``Linear`` layout (see :func:`mab`); ISAB and PMA
prefix the keys of their inner blocks (``"mab0.w_q"``, ...).
"""

from __future__ import annotations

from . import _checks as checks
from ._glue.set_transformer import (
    ISAB_REFERENCE,
    ISAB_RESIDUALS,
    MAB_REFERENCE,
    MAB_RESIDUALS,
    PMA_REFERENCE,
    PMA_RESIDUALS,
    SAB_REFERENCE,
    SAB_RESIDUALS,
    SetOptions,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["isab", "mab", "pma", "sab"]

_VARIANTS = ("paper", "code")
_LN = ("ln0_weight", "ln0_bias", "ln1_weight", "ln1_bias")


# -- validation ---------------------------------------------------------------------------------


def _shape(params, key):
    a = params.get(key) if hasattr(params, "get") else None
    return tuple(a.shape) if a is not None and hasattr(a, "shape") else None


def _rff_spec(params, prefix, d_in, d_out):
    """(required, optional, output width) of a row-wise feed-forward layer."""
    w = _shape(params, prefix + "w_ff")
    f = w[0] if w is not None and len(w) == 2 else -1
    w2 = _shape(params, prefix + "w_ff2")
    required = {prefix + "w_ff": (f, d_in)}
    optional = {prefix + "b_ff": (f,)}
    if w2 is not None:
        out = w2[0] if d_out is None and len(w2) == 2 else d_out
        required[prefix + "w_ff2"] = (out, f)
        optional[prefix + "b_ff2"] = (out,)
    else:
        out = f
        if d_out is not None and f != d_out and f != -1:
            raise ValueError(
                f"params[{prefix + 'w_ff'!r}]: without w_ff2 the feed-forward layer must keep the "
                f"width {d_out} (residual), expected shape {(d_out, d_in)}, got {w}"
            )
    return required, optional, out


def _mab_spec(params, prefix, dx, dy, heads, variant, ln):
    """(required, optional, output width) of the MAB keys under ``prefix``."""

    def rows(key):
        s = _shape(params, prefix + key)
        if s is not None and len(s) != 2:
            raise ValueError(
                f"params[{prefix + key!r}]: expected a 2-D (out, in) weight, got shape {s}"
            )
        return s[0] if s is not None else -1

    e, ev = rows("w_q"), rows("w_v")
    for width, key in ((e, "w_q"), (ev, "w_v")):
        if width > 0 and width % heads:
            raise ValueError(
                f"params[{prefix + key!r}]: output width {width} is not divisible by num_heads = "
                f"{heads}"
            )
    if variant == "paper":
        required = {"w_q": (e, dx), "w_k": (e, dy), "w_v": (ev, dy), "w_o": (dx, ev)}
        optional = {"b_q": (e,), "b_k": (e,), "b_v": (ev,), "b_o": (dx,)}
        d_out = dx
    else:
        required = {"w_q": (e, dx), "w_k": (e, dy), "w_v": (e, dy)}
        optional = {"b_q": (e,), "b_k": (e,), "b_v": (e,)}
        d_out = e
    required = {prefix + k: v for k, v in required.items()}
    optional = {prefix + k: v for k, v in optional.items()}
    if variant == "paper":
        r, o, _ = _rff_spec(params, prefix, d_out, d_out)
    else:
        r = {prefix + "w_ff": (d_out, d_out)}  # fc_o: Linear(dim_V, dim_V)
        o = {prefix + "b_ff": (d_out,)}
    required.update(r)
    optional.update(o)
    if ln:
        optional.update({prefix + k: (d_out,) for k in _LN})
    return required, optional, d_out


def _check_common(xp, num_heads, variant, ln, eps):
    heads = checks.check_int("num_heads", num_heads, minimum=1)
    checks.check_choice("variant", variant, _VARIANTS)
    if ln is None:
        ln = variant == "paper"
    if not isinstance(ln, bool):
        raise TypeError(f"ln: expected a bool or None, got {type(ln).__name__}")
    eps = checks.check_real("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps: expected eps > 0, got {eps!r}")
    return heads, ln, eps


def _check_set(xp, name, x, legend):
    checks.check_floating(xp, name, x)
    checks.check_ndim(name, x, 3, legend, exact=True)


def _check_params_dtype(params, like_name, like):
    checks.check_same_dtype(**{like_name: like}, **{f"params[{k!r}]": a for k, a in params.items()})


def _namespace(params, **arrays):
    return checks.namespace(**arrays, **checks.param_arrays(params))


# -- the MAB kernel -------------------------------------------------------------------------------


def _mab_params(rng, dx, dy, e, heads, variant, ln, prefix=""):
    out = {"w_q": (e, dx), "w_k": (e, dy), "w_v": (e, dy), "b_q": (e,), "b_k": (e,), "b_v": (e,)}
    d_out = dx if variant == "paper" else e
    if variant == "paper":
        out.update(
            {
                "w_o": (dx, e),
                "b_o": (dx,),
                "w_ff": (7, dx),
                "b_ff": (7,),
                "w_ff2": (dx, 7),
                "b_ff2": (dx,),
            }
        )
    else:
        out.update({"w_ff": (e, e), "b_ff": (e,)})
    if ln:
        out.update({k: (d_out,) for k in _LN})
    # No b_k: its gradient is exactly zero (softmax is shift invariant), so a relative
    # finite-difference error would only measure rounding noise.
    params = {prefix + k: rng.standard_normal(s) / 2 for k, s in out.items() if k != "b_k"}
    for k in _LN[::2]:
        if prefix + k in params:
            params[prefix + k] = params[prefix + k] + 1.0
    return params


def _mab_examples(rng):
    x, y = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 5, 3))
    return [
        ((x, y, _mab_params(rng, 6, 3, 4, 2, "paper", True)), {"num_heads": 2}),
        (
            (x, y, _mab_params(rng, 6, 3, 4, 2, "code", True)),
            {"num_heads": 2, "variant": "code", "ln": True},
        ),
        ((x, y, _mab_params(rng, 6, 3, 6, 3, "code", False)), {"num_heads": 3, "variant": "code"}),
    ]


@op(
    differentiable=("x", "y", "params"),
    reference=MAB_REFERENCE,
    residuals=MAB_RESIDUALS,
    examples=_mab_examples,
)
def mab(
    x: Array,
    y: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    variant: str = "paper",
    ln: bool | None = None,
    eps: float = 1e-5,
) -> Call[Array]:
    r"""Multihead attention block ``MAB(X, Y)`` of the Set Transformer (Lee et al. 2019, §3.1).

    ``variant='paper'``: ``MAB(X, Y) = LN1(H + rFF(H))``, ``H = LN0(X + Multihead(X, Y, Y))``
    where ``Multihead`` is :func:`multi_head_attention` (per-head scale ``1/√d_h``, output
    projection ``w_o``) and ``rFF(h) = relu(h w_ffᵀ + b_ff)``, followed by ``· w_ff2ᵀ + b_ff2``
    when ``w_ff2`` is given.

    ``variant='code'``: the official module (``juho-lee/set_transformer`` ``modules.py``
    ``MAB``): ``Q' = X w_qᵀ + b_q``, ``K' = Y w_kᵀ + b_k``, ``V' = Y w_vᵀ + b_v``;
    ``O = Q' + concat_j softmax(Q'_j K'_jᵀ / √dim_V) V'_j`` (scale over the **full** width
    ``dim_V``, residual on the **projected** query, **no** output projection);
    ``O = LN0(O)``; ``O = O + relu(O w_ffᵀ + b_ff)``; ``O = LN1(O)``. Its modules map as
    ``fc_q → w_q/b_q``, ``fc_k → w_k/b_k``, ``fc_v → w_v/b_v``, ``fc_o → w_ff/b_ff``,
    ``ln0 → ln0_weight/ln0_bias``, ``ln1 → ln1_weight/ln1_bias``.

    Parameters
    ----------
    x : array, shape (N, n, dx)
        Query set ``X``.
    y : array, shape (N, m, dy)
        Key/value set ``Y``.
    params : mapping of str to array
        PyTorch ``Linear`` layout (out, in). ``'paper'``: ``w_q`` (E, dx), ``w_k`` (E, dy),
        ``w_v`` (Ev, dy), ``w_o`` (dx, Ev), ``w_ff`` (F, dx) and, when F != dx, ``w_ff2`` (dx, F);
        optional biases ``b_q, b_k, b_v, b_o, b_ff, b_ff2``. ``'code'``: ``w_q`` (dV, dx),
        ``w_k`` (dV, dy), ``w_v`` (dV, dy), ``w_ff`` (dV, dV), optional ``b_q, b_k, b_v, b_ff``.
        With ``ln``: optional affine ``ln0_weight, ln0_bias, ln1_weight, ln1_bias`` (width of the
        output; omitted = no affine).
    num_heads : int
        h; divides E and Ev (paper) or dV (code).
    variant : {'paper', 'code'}, default 'paper'
    ln : bool, optional
        Apply the two layer norms; default ``True`` for ``'paper'`` (the equations have them),
        ``False`` for ``'code'`` (the module's default ``ln=False``).
    eps : float, default 1e-5
        Layer-norm epsilon (PyTorch's default).

    Returns
    -------
    out : array, shape (N, n, dx) (paper) or (N, n, dV) (code)

    Notes
    -----
    Shape legend: ``N`` batch of sets, ``n``/``m`` set sizes, ``dx``/``dy`` input widths,
    ``E``/``Ev`` attention widths (h heads of ``E/h``), ``F`` hidden width of rFF, ``dV`` the code
    variant's width. Sets are dense (no masks, as in the official module). ``.bwd`` gives
    gradients for ``x``, ``y`` and every entry of ``params``. The attention runs through
    :func:`multi_head_attention` (paper) or :func:`scaled_dot_product_attention` (code) on the
    active backend; their residuals are nested in this op's. See *Set Transformer: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> d, h = 8, 2
    >>> p = {k: rng.standard_normal((d, d)) / d for k in ("w_q", "w_k", "w_v", "w_o", "w_ff")}
    >>> x, y = rng.standard_normal((3, 5, d)), rng.standard_normal((3, 7, d))
    >>> out, res = aa.mab.fwd(x, y, p, num_heads=h)
    >>> g = aa.mab.bwd(res, np.ones_like(out))
    >>> out.shape, g.y.shape, sorted(g.params)
    ((3, 5, 8), (3, 7, 8), ['w_ff', 'w_k', 'w_o', 'w_q', 'w_v'])
    >>> code = {k: p[k] for k in ("w_q", "w_k", "w_v", "w_ff")}
    >>> aa.mab(x, y, code, num_heads=h, variant="code").shape
    (3, 5, 8)
    """
    xp = _namespace(params, x=x, y=y)
    _check_set(xp, "x", x, "(N, n, dx)")
    _check_set(xp, "y", y, "(N, m, dy)")
    checks.check_same_dtype(x=x, y=y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected batch N = {x.shape[0]} (from x), got shape {tuple(y.shape)}")
    heads, ln, eps = _check_common(xp, num_heads, variant, ln, eps)
    required, optional, _ = _mab_spec(params, "", x.shape[-1], y.shape[-1], heads, variant, ln)
    clean = checks.check_params(params, required, optional)
    _check_params_dtype(clean, "x", x)
    return Call(
        xp,
        {"x": x, "y": y, "params": clean},
        SetOptions(num_heads=heads, variant=variant, ln=ln, eps=eps),
    )


# -- SAB ------------------------------------------------------------------------------------------


def _sab_examples(rng):
    x = rng.standard_normal((2, 5, 4))
    return [
        ((x, _mab_params(rng, 4, 4, 4, 2, "paper", True)), {"num_heads": 2}),
        (
            (x, _mab_params(rng, 4, 4, 6, 2, "code", True)),
            {"num_heads": 2, "variant": "code", "ln": True},
        ),
    ]


@op(
    differentiable=("x", "params"),
    reference=SAB_REFERENCE,
    residuals=SAB_RESIDUALS,
    examples=_sab_examples,
)
def sab(
    x: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    variant: str = "paper",
    ln: bool | None = None,
    eps: float = 1e-5,
) -> Call[Array]:
    r"""Set attention block ``SAB(X) = MAB(X, X)`` (Lee et al. 2019, §3.2).

    Parameters
    ----------
    x : array, shape (N, n, d)
    params : mapping of str to array
        The keys of :func:`mab` (with ``dy = dx = d``).
    num_heads, variant, ln, eps
        As in :func:`mab`.

    Returns
    -------
    out : array, shape (N, n, d) (paper) or (N, n, dV) (code)

    Notes
    -----
    Shape legend as in :func:`mab`. Cost O(n²): use :func:`isab` for large sets. The gradient of
    ``x`` is the sum of MAB's query-side and key/value-side gradients.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> p = {k: rng.standard_normal((6, 4)) / 4 for k in ("w_q", "w_k", "w_v")}
    >>> p["w_ff"] = rng.standard_normal((6, 6)) / 6
    >>> aa.sab(rng.standard_normal((2, 9, 4)), p, num_heads=3, variant="code").shape
    (2, 9, 6)
    """
    xp = _namespace(params, x=x)
    _check_set(xp, "x", x, "(N, n, d)")
    heads, ln, eps = _check_common(xp, num_heads, variant, ln, eps)
    required, optional, _ = _mab_spec(params, "", x.shape[-1], x.shape[-1], heads, variant, ln)
    clean = checks.check_params(params, required, optional)
    _check_params_dtype(clean, "x", x)
    return Call(
        xp,
        {"x": x, "params": clean},
        SetOptions(num_heads=heads, variant=variant, ln=ln, eps=eps),
    )


# -- ISAB -----------------------------------------------------------------------------------------


def _isab_params(rng, d_in, d_ind, m, e, variant, ln):
    p = {"I": rng.standard_normal((m, d_ind))}
    p.update(_mab_params(rng, d_ind, d_in, e, 2, variant, ln, "mab0."))
    d_h = d_ind if variant == "paper" else e
    p.update(_mab_params(rng, d_in, d_h, e, 2, variant, ln, "mab1."))
    return p


def _isab_examples(rng):
    x = rng.standard_normal((2, 6, 3))
    return [
        ((x, _isab_params(rng, 3, 4, 3, 4, "paper", True)), {"num_heads": 2}),
        (
            (x, _isab_params(rng, 3, 4, 3, 4, "code", True)),
            {"num_heads": 2, "variant": "code", "ln": True},
        ),
    ]


@op(
    differentiable=("x", "params"),
    reference=ISAB_REFERENCE,
    residuals=ISAB_RESIDUALS,
    examples=_isab_examples,
)
def isab(
    x: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    variant: str = "paper",
    ln: bool | None = None,
    eps: float = 1e-5,
) -> Call[Array]:
    r"""Induced set attention block ``ISAB_m(X) = MAB(X, H)``, ``H = MAB(I, X)`` (Lee et al. §3.2).

    ``m`` learned inducing points ``I`` attend to the set, then the set attends to the ``m``
    results: O(n·m) instead of O(n²).

    Parameters
    ----------
    x : array, shape (N, n, d)
    params : mapping of str to array
        ``I`` (m, dI) — the inducing points (the official ``ISAB.I`` has shape (1, m, dim_out):
        pass ``I[0]``) — and the :func:`mab` keys of the two blocks prefixed ``mab0.`` (query
        ``I``, keys ``X``) and ``mab1.`` (query ``X``, keys ``H``).
    num_heads, variant, ln, eps
        As in :func:`mab`, shared by both blocks.

    Returns
    -------
    out : array, shape (N, n, d) (paper) or (N, n, dV) (code)

    Notes
    -----
    Shape legend: ``N`` batch, ``n`` set size, ``d`` input width, ``m`` inducing points, ``dI``
    their width (the paper variant needs ``dI`` = the width of ``H``). ``I`` is shared by the batch,
    so its gradient is summed over ``N``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> d, m = 4, 3
    >>> names = ("w_q", "w_k", "w_v", "w_o", "w_ff")
    >>> blk = lambda pre: {pre + k: rng.standard_normal((d, d)) / d for k in names}
    >>> p = {"I": rng.standard_normal((m, d)), **blk("mab0."), **blk("mab1.")}
    >>> out, res = aa.isab.fwd(rng.standard_normal((2, 10, d)), p, num_heads=2)
    >>> g = aa.isab.bwd(res, np.ones_like(out))
    >>> out.shape, g.params["I"].shape
    ((2, 10, 4), (3, 4))
    """
    xp = _namespace(params, x=x)
    _check_set(xp, "x", x, "(N, n, d)")
    heads, ln, eps = _check_common(xp, num_heads, variant, ln, eps)
    _check_prefixes(params, ("I",), ("mab0.", "mab1."))
    s_i = _shape(params, "I")
    if s_i is None or len(s_i) != 2:
        raise ValueError(f"params['I']: expected inducing points of shape (m, dI), got {s_i}")
    r0, o0, d_h = _mab_spec(params, "mab0.", s_i[1], x.shape[-1], heads, variant, ln)
    r1, o1, _ = _mab_spec(params, "mab1.", x.shape[-1], d_h, heads, variant, ln)
    clean = checks.check_params(params, {"I": s_i, **r0, **r1}, {**o0, **o1})
    _check_params_dtype(clean, "x", x)
    return Call(
        xp,
        {"x": x, "params": clean},
        SetOptions(num_heads=heads, variant=variant, ln=ln, eps=eps),
    )


def _check_prefixes(params, plain, prefixes):
    if not hasattr(params, "keys"):
        return
    bad = sorted(k for k in params if k not in plain and not any(k.startswith(p) for p in prefixes))
    if bad:
        raise ValueError(
            f"params: unknown keys {bad}; expected {list(plain)} and keys prefixed {list(prefixes)}"
        )


# -- PMA ------------------------------------------------------------------------------------------


def _pma_examples(rng):
    z = rng.standard_normal((2, 6, 5))
    paper = {"S": rng.standard_normal((2, 5))}
    paper.update(_mab_params(rng, 5, 5, 4, 2, "paper", True, "mab."))
    paper.update({"rff.w_ff": rng.standard_normal((5, 5)) / 2, "rff.b_ff": rng.standard_normal(5)})
    code = {"S": rng.standard_normal((3, 5))}
    code.update(_mab_params(rng, 5, 5, 4, 2, "code", False, "mab."))
    return [
        ((z, paper), {"num_heads": 2}),
        ((z, code), {"num_heads": 2, "variant": "code"}),
    ]


@op(
    differentiable=("z", "params"),
    reference=PMA_REFERENCE,
    residuals=PMA_RESIDUALS,
    examples=_pma_examples,
)
def pma(
    z: Array,
    params: dict[str, Array],
    *,
    num_heads: int,
    variant: str = "paper",
    ln: bool | None = None,
    eps: float = 1e-5,
) -> Call[Array]:
    r"""Pooling by multihead attention ``PMA_k(Z) = MAB(S, rFF(Z))`` (Lee et al. 2019, §3.2).

    ``k`` learned seed vectors ``S`` attend to the set: ``k`` outputs whatever the set size.

    Parameters
    ----------
    z : array, shape (N, n, dz)
    params : mapping of str to array
        ``S`` (k, dS) — the seeds (the official ``PMA.S`` has shape (1, k, dim): pass ``S[0]``) —
        and the :func:`mab` keys of the block prefixed ``mab.``. ``'paper'``: optionally the
        row-wise feed-forward layer applied to ``Z`` first, ``rff.w_ff`` (F, dz), ``rff.b_ff``,
        ``rff.w_ff2`` (F2, F), ``rff.b_ff2`` (the paper's ``rFF(Z)``; without them ``Z`` is used
        as is). ``'code'``: no ``rff.*`` keys (the official PMA applies no rFF to ``Z``).
    num_heads, variant, ln, eps
        As in :func:`mab`.

    Returns
    -------
    out : array, shape (N, k, dS) (paper) or (N, k, dV) (code)

    Notes
    -----
    Shape legend: ``N`` batch, ``n`` set size, ``dz`` input width, ``k`` seeds, ``dS`` their width.
    ``S`` is shared by the batch, so its gradient is summed over ``N``. With one seed, PMA's
    attention core is single-query attention pooling (see :func:`fused_attention`).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> d = 4
    >>> p = {"S": rng.standard_normal((1, d)),
    ...      **{"mab." + k: rng.standard_normal((d, d)) / d
    ...         for k in ("w_q", "w_k", "w_v", "w_o", "w_ff")},
    ...      "rff.w_ff": rng.standard_normal((d, d)) / d}
    >>> aa.pma(rng.standard_normal((3, 11, d)), p, num_heads=2).shape
    (3, 1, 4)
    """
    xp = _namespace(params, z=z)
    _check_set(xp, "z", z, "(N, n, dz)")
    heads, ln, eps = _check_common(xp, num_heads, variant, ln, eps)
    rff_keys = ("rff.w_ff", "rff.b_ff", "rff.w_ff2", "rff.b_ff2")
    _check_prefixes(params, ("S",) + (rff_keys if variant == "paper" else ()), ("mab.",))
    s_s = _shape(params, "S")
    if s_s is None or len(s_s) != 2:
        raise ValueError(f"params['S']: expected seed vectors of shape (k, dS), got {s_s}")
    req, opt = {"S": s_s}, {}
    d_z = z.shape[-1]
    if variant == "paper" and any(k in params for k in rff_keys):
        r, o, d_z = _rff_spec(params, "rff.", z.shape[-1], None)
        req.update(r)
        opt.update(o)
    r, o, _ = _mab_spec(params, "mab.", s_s[1], d_z, heads, variant, ln)
    clean = checks.check_params(params, {**req, **r}, {**opt, **o})
    _check_params_dtype(clean, "z", z)
    return Call(
        xp,
        {"z": z, "params": clean},
        SetOptions(num_heads=heads, variant=variant, ln=ln, eps=eps),
    )

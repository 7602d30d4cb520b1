"""Criss-cross attention and the recurrent criss-cross block of CCNet: the public ops."""

from __future__ import annotations

from . import _checks as checks
from ._glue.criss_cross import (
    BLOCK_BIASES,
    BLOCK_REFERENCE,
    BLOCK_RESIDUALS,
    CCA_REFERENCE,
    CCA_RESIDUALS,
    BlockOptions,
    CcaOptions,
    criss_cross_adapter,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["criss_cross_attention", "criss_cross_block"]


# -- criss-cross attention ----------------------------------------------------------------------


def _cca_examples(rng):
    q = rng.standard_normal((2, 4, 5, 3))
    k = rng.standard_normal((2, 4, 5, 3))
    v = rng.standard_normal((2, 4, 5, 2))
    return [
        ((q, k, v), {}),
        ((q, k, v), {"scale": 0.5}),
        ((q[:, :1], k[:, :1], v[:, :1]), {}),  # H = 1: the row only
        ((q[..., :1, :], k[..., :1, :], v[..., :1, :]), {"scale": 2.0}),  # W = 1: the column only
    ]


@op(
    differentiable=("q", "k", "v"),
    reference=CCA_REFERENCE,
    residuals=CCA_RESIDUALS,
    adapt=criss_cross_adapter,
    examples=_cca_examples,
)
def criss_cross_attention(q: Array, k: Array, v: Array, *, scale: float = 1.0) -> Call[Array]:
    r"""Criss-cross attention (CCNet): each pixel attends jointly to its row and its column.

    For pixel ``u = (y, x)`` the keys are ``Ω(u) = {(y, x')}_x' ∪ {(y', x)}_{y' ≠ y}``, the
    ``H + W - 1`` positions of its row and column with itself counted once, and
    ``out_u = Σ_{n ∈ Ω(u)} softmax_n(scale · q_u · k_n) v_n`` (one softmax over all of Ω(u)).
    The work is a batched product along each row and one along each column; no ``HW × HW``
    matrix is formed, and the extra memory is O(H·W·(H + W)).

    Parameters
    ----------
    q : array, shape (..., H, W, dk)
        Queries, channel-last.
    k : array, shape (..., H, W, dk)
        Keys.
    v : array, shape (..., H, W, dv)
        Values.
    scale : float, default 1.0
        Logit scale. CCNet uses no scaling (1.0), which is the default here (not ``1/sqrt(dk)``).

    Returns
    -------
    out : array, shape (..., H, W, dv)
        In the dtype of ``q``.

    Notes
    -----
    Shape legend: ``...`` batch (and head) dimensions, ``H``/``W`` the map's height and width,
    ``dk`` query/key width, ``dv`` value width. With ``H = 1`` (``W = 1``) a pixel attends to its
    row (column) only. Equal to CCNet's ``ca_weight``/softmax/``ca_map`` on the same (NCHW ->
    NHWC permuted) tensors and to its pure-PyTorch ``CrissCrossAttention`` core (before ``gamma``
    and the residual, see :func:`criss_cross_block`). ``.bwd`` gives gradients for ``q``, ``k``
    and ``v``; the derivation is in *Criss-cross attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 6, 7, 4), dtype=np.float32)   # (N, H, W, dk)
    >>> v = rng.standard_normal((2, 6, 7, 16), dtype=np.float32)  # (N, H, W, dv)
    >>> out, res = aa.criss_cross_attention.fwd(q, q, v)
    >>> g = aa.criss_cross_attention.bwd(res, np.ones_like(out))
    >>> out.shape, g.q.shape, g.v.dtype
    ((2, 6, 7, 16), (2, 6, 7, 4), dtype('float32'))
    """
    xp = checks.namespace(q=q, k=k, v=v)
    legend = {"q": "(..., H, W, dk)", "k": "(..., H, W, dk)", "v": "(..., H, W, dv)"}
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(xp, name, x)
        checks.check_ndim(name, x, 3, legend[name])
    checks.check_same_dtype(q=q, k=k, v=v)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(
            f"v: expected shape {tuple(q.shape[:-1])} + (dv,) (from q), got {tuple(v.shape)}"
        )
    scale = checks.check_real("scale", scale)
    return Call(xp, {"q": q, "k": k, "v": v}, CcaOptions(scale=scale))


# -- the (recurrent) criss-cross block ----------------------------------------------------------


def _ccb_examples(rng):
    import numpy as np

    c, c8 = 4, 2
    params = {
        "w_q": rng.standard_normal((c8, c, 1, 1)) / 2,
        "b_q": rng.standard_normal(c8) / 2,
        "w_k": rng.standard_normal((c8, c, 1, 1)) / 2,
        "w_v": rng.standard_normal((c, c, 1, 1)) / 2,
        "b_v": rng.standard_normal(c) / 2,
        "gamma": np.asarray([0.7]),
    }
    x = rng.standard_normal((2, c, 3, 4))
    # (b_k is left out: it shifts every logit of a pixel by q·b_k, so its gradient is exactly 0
    # and a finite-difference ratio on it measures only rounding noise.)
    no_bias = {k: v for k, v in params.items() if not k.startswith("b_")}
    return [
        ((x, params), {}),
        ((x, no_bias), {"recurrence": 1}),
        ((x, params), {"recurrence": 3}),
    ]


@op(
    differentiable=("x", "params"),
    reference=BLOCK_REFERENCE,
    residuals=BLOCK_RESIDUALS,
    examples=_ccb_examples,
)
def criss_cross_block(x: Array, params: dict[str, Array], *, recurrence: int = 2) -> Call[Array]:
    r"""CCNet's recurrent criss-cross attention module (RCCA), with shared parameters.

    One step maps ``h`` to ``h' = gamma · CCA(W_q h + b_q, W_k h + b_k, W_v h + b_v) + h`` where
    ``W_*`` are 1×1 convolutions and CCA is :func:`criss_cross_attention` (no logit scaling);
    the step is applied ``recurrence`` times with the same parameters (CCNet trains with 2).
    As in CCNet's code (``CrissCrossAttention``), ``gamma`` is a learned scalar, initialised to
    0 there.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
        Input feature map.
    params : mapping of str to array
        PyTorch ``Conv2d`` layout: ``w_q`` (C', C, 1, 1), ``w_k`` (C', C, 1, 1), ``w_v``
        (C, C, 1, 1), optional biases ``b_q`` (C',), ``b_k`` (C',), ``b_v`` (C,), and ``gamma``
        (1,). CCNet uses ``C' = C // 8``; any ``C' >= 1`` is allowed.
    recurrence : int, default 2
        Number of criss-cross steps R (>= 1), all with the same parameters.

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``C'`` query/key channels, ``H``/``W`` the map's
    height and width. ``.bwd`` gives the gradient of ``x`` and of every entry of ``params`` (a
    dict with the same keys); parameter gradients are summed over the ``recurrence`` steps. The
    surrounding 3×3 conv+BN layers of CCNet's head are not part of this op. Equal to
    ``RCCAModule``'s inner loop of ``CrissCrossAttention`` (``speedinghzl/CCNet``).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> C = 16
    >>> params = {"w_q": rng.standard_normal((2, C, 1, 1)),
    ...           "w_k": rng.standard_normal((2, C, 1, 1)),
    ...           "w_v": rng.standard_normal((C, C, 1, 1)), "gamma": np.array([0.5])}
    >>> x = rng.standard_normal((1, C, 5, 6))
    >>> y, res = aa.criss_cross_block.fwd(x, params, recurrence=2)
    >>> g = aa.criss_cross_block.bwd(res, np.ones_like(y))
    >>> y.shape, g.x.shape, sorted(g.params)
    ((1, 16, 5, 6), (1, 16, 5, 6), ['gamma', 'w_k', 'w_q', 'w_v'])
    """
    xp = checks.image_block_namespace(x, params)
    c = x.shape[1]
    w_q = params.get("w_q")
    if w_q is None:
        raise ValueError("params: missing required keys ['w_q']")
    if w_q.ndim != 4:
        raise ValueError(
            f"params['w_q']: expected a (C', C, 1, 1) weight, got shape {tuple(w_q.shape)}"
        )
    cq = w_q.shape[0]
    clean = checks.check_params(
        params,
        {"w_q": (cq, c, 1, 1), "w_k": (cq, c, 1, 1), "w_v": (c, c, 1, 1), "gamma": (1,)},
        {"b_q": (cq,), "b_k": (cq,), "b_v": (c,)},
    )
    recurrence = checks.check_int("recurrence", recurrence, minimum=1)
    return Call(
        xp,
        {"x": x, "params": clean},
        BlockOptions(
            recurrence=recurrence, biases=tuple(sorted(k for k in BLOCK_BIASES if k in clean))
        ),
    )

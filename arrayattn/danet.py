"""DANet position and channel attention modules (Fu et al., CVPR 2019, §3.2–3.3)."""

from __future__ import annotations

from . import _checks as checks
from ._glue.danet import (
    CAM_REFERENCE,
    CAM_RESIDUALS,
    PAM_REFERENCE,
    PAM_RESIDUALS,
    CamOptions,
    example_pam_params,
)
from ._kernel import Call, NoOptions
from ._op import op
from ._xp import Array

__all__ = ["channel_attention", "position_attention"]

_LOGITS = ("paper", "code")


# -- position attention module (PAM) --------------------------------------------------------------


def _pam_examples(rng):
    x = rng.standard_normal((2, 8, 3, 5))
    # b_key is left out: its gradient is exactly 0 (a per-query constant shift of the logits).
    return [
        ((x, example_pam_params(rng, 8, 2)), {}),
        ((x, example_pam_params(rng, 8, 1, bias=False)), {}),
    ]


@op(
    differentiable=("x", "params"),
    reference=PAM_REFERENCE,
    residuals=PAM_RESIDUALS,
    examples=_pam_examples,
)
def position_attention(x: Array, params: dict[str, Array]) -> Call[Array]:
    r"""DANet position attention module (PAM): ``E = γ · D softmax(BᵀC)ᵀ + A``.

    With ``A = x`` flattened to (C, P), ``B = W_q A + b_q``, ``C = W_k A + b_k`` (C→C_q) and
    ``D = W_v A + b_v`` (C→C): ``S = softmax_row(Bᵀ C)`` (row = query position ``i``, unscaled),
    ``E_i = γ Σ_j S_ij D_j + A_i`` — exactly ``PAM_Module.forward`` of ``junfu1115/DANet``
    (``encoding/nn/da_att.py``).

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    params : mapping of str to array
        1×1 ``Conv2d`` layout, as ``PAM_Module``'s ``query_conv``, ``key_conv``,
        ``value_conv`` and ``gamma``: ``w_query``, ``w_key`` (C_q, C, 1, 1), ``w_value``
        (C, C, 1, 1), ``gamma`` (1,); optional biases ``b_query``, ``b_key`` (C_q,),
        ``b_value`` (C,).

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``P = H·W`` positions,
    ``C_q`` query/key width (C/8 in DANet). The attention core is
    :func:`scaled_dot_product_attention` with ``scale=1`` on the active backend: tiled, O(P·C)
    memory, no P×P matrix. ``γ`` is initialised to 0 in DANet, which makes the block the
    identity and zeroes the gradients of every weight but ``γ``. The gradient of ``b_key`` is
    exactly 0 (it shifts every logit of a query row by the same amount). Derivation in
    *DANet: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> C = 16
    >>> p = {"w_query": rng.standard_normal((2, C, 1, 1)) / 4,
    ...      "w_key": rng.standard_normal((2, C, 1, 1)) / 4,
    ...      "w_value": rng.standard_normal((C, C, 1, 1)) / 4, "gamma": np.array([0.5])}
    >>> x = rng.standard_normal((2, C, 5, 6))
    >>> y, res = aa.position_attention.fwd(x, p)
    >>> g = aa.position_attention.bwd(res, np.ones_like(y))
    >>> y.shape, sorted(g.params)
    ((2, 16, 5, 6), ['gamma', 'w_key', 'w_query', 'w_value'])
    """
    xp = checks.image_block_namespace(x, params)
    c = x.shape[1]
    wq = params.get("w_query")
    if wq is None:
        raise ValueError("params: missing required key 'w_query'")
    if not hasattr(wq, "shape") or len(wq.shape) != 4:
        raise ValueError(
            f"params['w_query']: expected shape (C_q, {c}, 1, 1), got {getattr(wq, 'shape', wq)}"
        )
    cq = wq.shape[0]
    clean = checks.check_params(
        params,
        {"w_query": (cq, c, 1, 1), "w_key": (cq, c, 1, 1), "w_value": (c, c, 1, 1), "gamma": (1,)},
        {"b_query": (cq,), "b_key": (cq,), "b_value": (c,)},
    )
    return Call(xp, {"x": x, "params": clean}, NoOptions())


# -- channel attention module (CAM) ---------------------------------------------------------------


def _cam_examples(rng):
    x = rng.standard_normal((2, 5, 3, 4)) / 2
    gamma = rng.standard_normal(1)
    return [
        ((x, gamma), {}),
        ((x, gamma), {"logits": "code"}),
        ((x, rng.standard_normal(())), {"logits": "code"}),
    ]


@op(
    differentiable=("x", "gamma"),
    reference=CAM_REFERENCE,
    residuals=CAM_RESIDUALS,
    examples=_cam_examples,
)
def channel_attention(x: Array, gamma: Array, *, logits: str = "paper") -> Call[Array]:
    r"""DANet channel attention module (CAM): ``E = γ · softmax(±A Aᵀ) A + A``.

    ``A = x`` flattened to (C, P); no projections. The channel affinities ``A Aᵀ`` (C×C) are
    softmaxed along each row and re-weight the channels, ``E_j = γ Σ_i X_ji A_i + A_j``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    gamma : array, shape (1,) or ()
        The residual scale ``γ`` (``CAM_Module.gamma``, initialised to 0 in DANet).
    logits : {'paper', 'code'}, default 'paper'
        ``'paper'``: ``X = softmax(A Aᵀ)`` (the paper's equation). ``'code'``: the official
        ``CAM_Module`` (``junfu1115/DANet``), ``X = softmax(rowmax(A Aᵀ) − A Aᵀ)``. Softmax is
        shift-invariant, so this **equals** ``softmax(−A Aᵀ)``: the code gives the most weight to
        the *least* similar channels. It is computed as such (stable; the ``rowmax`` term
        carries no gradient).

    Returns
    -------
    y : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``P = H·W``. The core is
    :func:`scaled_dot_product_attention` with the C channels as tokens of width P, ``q = v = A``,
    ``k = ±A``, ``scale=1``. Logits ``A Aᵀ`` grow with ``P`` (10³–10⁵ are normal); the softmax
    is stable and accumulated in at least float32. Derivation in *DANet: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 8, 5, 5))
    >>> y, res = aa.channel_attention.fwd(x, np.array([0.5]), logits="code")
    >>> g = aa.channel_attention.bwd(res, np.ones_like(y))
    >>> y.shape, g.gamma.shape
    ((2, 8, 5, 5), (1,))
    """
    xp = checks.namespace(x=x, gamma=gamma)
    checks.check_floating(xp, "x", x)
    checks.check_ndim("x", x, 4, "(N, C, H, W)", exact=True)
    checks.check_same_dtype(x=x, gamma=gamma)
    if tuple(gamma.shape) not in ((), (1,)):
        raise ValueError(f"gamma: expected shape (1,) or (), got {tuple(gamma.shape)}")
    checks.check_choice("logits", logits, _LOGITS)
    return Call(xp, {"x": x, "gamma": gamma}, CamOptions(logits=logits))

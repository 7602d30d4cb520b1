"""Stochastic and discrete attention: hard attention with a REINFORCE surrogate, Gumbel-softmax
with straight-through, hard-concrete head gates.

Every op takes its randomness as an array of uniforms in ``[0, 1)`` drawn by the caller, so it is
a deterministic function of its arguments: the same uniforms give the same sample, forward and
backward.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from . import _checks as checks
from ._glue.hard import (
    CONCRETE_REFERENCE,
    CONCRETE_RESIDUALS,
    GUMBEL_REFERENCE,
    GUMBEL_RESIDUALS,
    HARD_REFERENCE,
    HARD_RESIDUALS,
    ConcreteOptions,
    GumbelOptions,
)
from ._kernel import Call, NoOptions
from ._op import op
from ._xp import Array

__all__ = [
    "gumbel_softmax",
    "hard_attention",
    "hard_concrete_gate",
    "moving_average_baseline",
    "reinforce_cotangents",
]


# -- hard attention -------------------------------------------------------------------------------


def _ha_examples(rng):
    a = rng.standard_normal((2, 3, 6, 4))
    e = rng.standard_normal((2, 3, 6))
    u = rng.random((2, 3))
    mask = rng.random((2, 3, 6)) > 0.3
    mask[1, 2] = False
    return [((a, e, u), {}), ((a, e, u), {"mask": mask})]


@op(
    differentiable=("a", "e"),
    reference=HARD_REFERENCE,
    residuals=HARD_RESIDUALS,
    examples=_ha_examples,
)
def hard_attention(
    a: Array, e: Array, uniforms: Array, *, mask: Array | None = None
) -> Call[Array]:
    r"""Stochastic hard attention (Xu et al. 2015, *Show, Attend and Tell* §4.1).

    Samples one location ``s̃ ~ Multinoulli(α)``, ``α = softmax(e)``, from caller-given uniforms
    and returns the glimpse ``ẑ = a_s̃`` together with the two terms of the REINFORCE surrogate,
    ``log p(s̃|a) = log α_s̃`` and the entropy ``H = −Σ_i α_i log α_i``.

    The gradient of the paper's objective (its estimator of ``∂L_s/∂W``)::

        ∂ log p(y|s̃,a)/∂W + λ_r (log p(y|s̃,a) − b) ∂ log p(s̃|a)/∂W + λ_e ∂H/∂W

    is exactly ``.bwd`` with the cotangents ``(dẑ, None, λ_r (log p(y|s̃) − b), λ_e)``, where
    ``dẑ = ∂ log p(y|s̃)/∂ẑ`` comes from the decoder: it is the gradient of the surrogate
    ``log p(y|s̃) + stop_grad(λ_r (log p(y|s̃) − b)) · log p(s̃|a) + λ_e H``.
    :func:`reinforce_cotangents` builds that tuple, :func:`moving_average_baseline` updates
    ``b``. For a loss to *minimise*, negate the cotangents.

    Parameters
    ----------
    a : array, shape (..., L, D)
        Annotation vectors ``a_i``.
    e : array, shape (..., L)
        Attention scores (logits) ``e_i`` (from the attention MLP). To sample from given
        probabilities ``α``, pass ``log α``.
    uniforms : array, shape (...)
        One uniform number in ``[0, 1)`` per row; the location drawn is
        ``min{i : α_1 + ... + α_i > u}`` (inverse CDF).
    mask : bool array, optional
        Broadcastable to (..., L); ``True`` = may be attended. A row with no location left draws
        nothing: glimpse 0, ``sample`` 0, ``log_prob`` 0, ``entropy`` 0, zero gradients.

    Returns
    -------
    glimpse : array, shape (..., D)
        ``ẑ = Σ_i s̃_i a_i``, dtype of ``a``.
    sample : array, shape (..., L)
        One-hot ``s̃`` (dtype of ``a``); not differentiable (its cotangent is ignored).
    log_prob : array, shape (...)
        ``log p(s̃|a) = log α_s̃``, dtype of ``e``.
    entropy : array, shape (...)
        ``H[α]``, dtype of ``e``.

    Notes
    -----
    Shape legend: ``...`` batch (and time) dimensions, ``L`` locations, ``D`` annotation width.
    Gradients: ``∂ẑ/∂a_i = s̃_i``, ``ẑ`` does not depend on ``e``; ``∂ log p(s̃|a)/∂e = s̃ − α``;
    ``∂H/∂e = −α ⊙ (log α + H)``. Not included: the paper's trick of replacing the sample by its
    expectation with probability 1/2 (run soft attention for those rows) and the soft variant's
    ``β`` gate (derivation: docs/derivations/hard.rst).

    Examples
    --------
    One training step (objective to maximise; a linear "decoder" ``log p(y|ẑ) = w·ẑ``):

    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((4, 6, 3))           # 4 images, 6 locations, D = 3
    >>> e = rng.standard_normal((4, 6))              # scores from the attention MLP
    >>> u = rng.random(4)                            # the caller's randomness
    >>> (z, s, log_prob, entropy), res = aa.hard_attention.fwd(a, e, u)
    >>> w = rng.standard_normal(3)
    >>> log_p_y, dz = z @ w, np.broadcast_to(w, z.shape)   # decoder value and gradient in ẑ
    >>> b = aa.moving_average_baseline(0.0, log_p_y.mean())   # b_k = 0.9 b_{k-1} + 0.1 log p(y|s̃_k)
    >>> cts = aa.reinforce_cotangents(dz, log_p_y, b, lambda_r=1.0, lambda_e=0.01)
    >>> g = aa.hard_attention.bwd(res, cts)          # the Show-Attend-Tell estimator
    >>> g.a.shape, g.e.shape, s.sum(-1)
    ((4, 6, 3), (4, 6), array([1., 1., 1., 1.]))
    """
    xp = checks.namespace(a=a, e=e, uniforms=uniforms, mask=mask)
    checks.check_floating(xp, "a", a)
    checks.check_floating(xp, "e", e)
    checks.check_floating(xp, "uniforms", uniforms)
    checks.check_ndim("a", a, 2, "(..., L, D)")
    checks.check_ndim("e", e, 1, "(..., L)")
    if tuple(e.shape) != tuple(a.shape[:-1]):
        raise ValueError(
            f"e: expected shape (..., L) = {tuple(a.shape[:-1])} (from a), got {tuple(e.shape)}"
        )
    if tuple(uniforms.shape) != tuple(a.shape[:-2]):
        raise ValueError(
            f"uniforms: expected shape (...) = {tuple(a.shape[:-2])} (one per row of e), "
            f"got {tuple(uniforms.shape)}"
        )
    if mask is not None:
        checks.check_bool(xp, "mask", mask)
        checks.check_broadcastable("mask", mask.shape, tuple(e.shape), "(..., L)")
        mask = xp.broadcast_to(mask, tuple(e.shape))
    return Call(
        xp,
        {"a": a, "e": e, "uniforms": uniforms, "mask": mask},
        NoOptions(),
        ("glimpse", "sample", "log_prob", "entropy"),
    )


def moving_average_baseline(baseline: Any, log_p_y: Any, *, decay: float = 0.9) -> Any:
    """The moving-average REINFORCE baseline of Show, Attend and Tell:
    ``b_k = decay · b_{k−1} + (1 − decay) · log p(y|s̃_k)``.

    Parameters
    ----------
    baseline : float or array
        ``b_{k−1}`` (start with 0).
    log_p_y : float or array
        ``log p(y|s̃_k, a)`` of the current step (e.g. its mean over the minibatch).
    decay : float, default 0.9

    Returns
    -------
    float or array
        ``b_k``; treat it as a constant (no gradient flows through the baseline).

    Examples
    --------
    >>> import arrayattn as aa
    >>> round(aa.moving_average_baseline(1.0, -2.0), 12)
    0.7
    """
    decay = checks.check_real("decay", decay)
    return decay * baseline + (1.0 - decay) * log_p_y


def reinforce_cotangents(
    dglimpse: Array, log_p_y: Array, baseline: Any, *, lambda_r: float = 1.0, lambda_e: float = 0.0
) -> tuple[Array, None, Array, Array]:
    """Cotangents for ``hard_attention.bwd`` that make it return the Show-Attend-Tell estimator.

    ``(dẑ, None, λ_r (log p(y|s̃) − b), λ_e)``, the last two broadcast to the row shape (...):
    these are the gradients of the surrogate
    ``log p(y|s̃) + stop_grad(λ_r (log p(y|s̃) − b)) · log p(s̃|a) + λ_e H`` with respect to the
    outputs ``(glimpse, sample, log_prob, entropy)`` of :func:`hard_attention`.

    Parameters
    ----------
    dglimpse : array, shape (..., D)
        ``∂ log p(y|s̃, a)/∂ẑ`` from the decoder.
    log_p_y : array, shape (...) or scalar
        ``log p(y|s̃, a)`` per row.
    baseline : float or array
        ``b`` (see :func:`moving_average_baseline`).
    lambda_r, lambda_e : float
        Weights of the REINFORCE and entropy terms.

    Returns
    -------
    tuple
        ``(dglimpse, None, dlog_prob, dentropy)``.
    """
    xp = array_api_compat.array_namespace(dglimpse)
    lambda_r = checks.check_real("lambda_r", lambda_r)
    lambda_e = checks.check_real("lambda_e", lambda_e)
    rows = tuple(dglimpse.shape[:-1])
    lp = xp.asarray(log_p_y, dtype=dglimpse.dtype, device=array_api_compat.device(dglimpse))
    b = xp.asarray(baseline, dtype=dglimpse.dtype, device=array_api_compat.device(dglimpse))
    dlog_prob = xp.broadcast_to(lambda_r * (lp - b), rows)
    dentropy = xp.full(
        rows, lambda_e, dtype=dglimpse.dtype, device=array_api_compat.device(dglimpse)
    )
    return dglimpse, None, dlog_prob, dentropy


# -- Gumbel-softmax -------------------------------------------------------------------------------


def _gs_examples(rng):
    logits = rng.standard_normal((3, 5))
    u = rng.random((3, 5))
    return [
        ((logits, u), {}),
        ((logits, u), {"tau": 0.5}),
        ((logits.T, u.T), {"tau": 2.0, "axis": 0}),
    ]


@op(
    differentiable=("logits",),
    reference=GUMBEL_REFERENCE,
    residuals=GUMBEL_RESIDUALS,
    examples=_gs_examples,
)
def gumbel_softmax(
    logits: Array,
    uniforms: Array,
    *,
    tau: float = 1.0,
    hard: bool = False,
    axis: int = -1,
    eps: float | None = None,
) -> Call[Array]:
    r"""Gumbel-softmax / Concrete sample (Jang et al. 2017; Maddison et al. 2017).

    ``y = softmax((ℓ + g)/τ)`` along ``axis`` with Gumbel noise ``g = −log(−log u)`` from the
    caller's uniforms ``u`` (clamped to ``[eps, 1 − eps]``). With ``hard=True`` the forward
    value is the one-hot of ``argmax y`` and the backward is the soft one (straight-through,
    ``y_hard − stop_grad(y) + y``), as ``torch.nn.functional.gumbel_softmax``; given the same noise
    the two agree.

    Parameters
    ----------
    logits : array
        Unnormalised log-probabilities ``ℓ`` (or ``log π``).
    uniforms : array, same shape as ``logits``
        Uniform numbers in ``[0, 1)``, any real floating dtype.
    tau : float, default 1.0
        Temperature ``τ > 0``. The softmax is computed in log space, so small ``τ`` does not
        overflow.
    hard : bool, default False
        Straight-through: forward one-hot (first maximum), backward the soft gradient.
    axis : int, default -1
        The categorical axis.
    eps : float, optional
        Clamp of the uniforms; default: the machine epsilon of the compute dtype (float32 for
        float16/bfloat16 logits).

    Returns
    -------
    y : array, shape and dtype of ``logits``

    Notes
    -----
    Gradient (soft and straight-through alike): ``dℓ = (1/τ) y ⊙ (dy − ⟨dy, y⟩)`` with the soft
    ``y``. PyTorch draws its noise as ``−log E`` with ``E ~ Exponential(1)``; ``E = −log u`` is the
    same distribution, which is how a test reproduces it.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> logits, u = rng.standard_normal((2, 4)), rng.random((2, 4))
    >>> y = aa.gumbel_softmax(logits, u, tau=0.5)
    >>> bool(np.allclose(y.sum(-1), 1))
    True
    >>> y_hard, res = aa.gumbel_softmax.fwd(logits, u, tau=0.5, hard=True)
    >>> bool((y_hard.argmax(-1) == y.argmax(-1)).all()), y_hard.sum(-1)
    (True, array([1., 1.]))
    >>> g = aa.gumbel_softmax.bwd(res, np.ones_like(y_hard))   # soft gradient
    >>> bool(np.allclose(g.logits, 0))
    True
    """
    xp = checks.namespace(logits=logits, uniforms=uniforms)
    checks.check_floating(xp, "logits", logits)
    checks.check_floating(xp, "uniforms", uniforms)
    checks.check_ndim("logits", logits, 1, "(..., n)")
    if tuple(uniforms.shape) != tuple(logits.shape):
        raise ValueError(
            f"uniforms: expected the shape of logits {tuple(logits.shape)}, got "
            f"{tuple(uniforms.shape)}"
        )
    tau = checks.check_real("tau", tau)
    if tau <= 0:
        raise ValueError(f"tau: expected a temperature > 0, got {tau!r}")
    if not isinstance(hard, bool):
        raise TypeError(f"hard: expected a bool, got {type(hard).__name__}")
    axis = checks.check_int("axis", axis)
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis: expected an axis of logits (ndim {logits.ndim}), got {axis}")
    axis = axis % logits.ndim
    if eps is None:
        from ._xp import compute_dtype

        eps = float(xp.finfo(compute_dtype(xp, logits.dtype)).eps)
    else:
        eps = checks.check_real("eps", eps)
        if not 0 <= eps < 0.5:
            raise ValueError(f"eps: expected 0 <= eps < 0.5, got {eps!r}")
    return Call(
        xp,
        {"logits": logits, "uniforms": uniforms},
        GumbelOptions(tau=tau, hard=hard, axis=axis, eps=eps),
    )


# -- hard-concrete gates --------------------------------------------------------------------------


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy's broadcast of two shapes, or None when they do not broadcast."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _hc_examples(rng):
    log_alpha = rng.standard_normal(6) * 2
    u = rng.random((3, 6))
    return [
        ((log_alpha, u), {}),
        ((log_alpha, u[0]), {"beta": 0.33}),
        ((log_alpha,), {"training": False}),
    ]


@op(
    differentiable=("log_alpha",),
    reference=CONCRETE_REFERENCE,
    residuals=CONCRETE_RESIDUALS,
    examples=_hc_examples,
)
def hard_concrete_gate(
    log_alpha: Array,
    uniforms: Array | None = None,
    *,
    beta: float = 2.0 / 3.0,
    gamma: float = -0.1,
    zeta: float = 1.1,
    eps: float = 1e-6,
    training: bool = True,
    hard: bool = False,
) -> Call[Array]:
    r"""Hard-concrete gates and their L0 penalty (Louizos, Welling, Kingma 2018; the head gates of
    Voita et al. 2019).

    Training (``u`` clamped to ``[eps, 1 − eps]``)::

        s = σ((log u − log(1 − u) + log α)/β),   s̄ = s (ζ − γ) + γ,   g = min(1, max(0, s̄))

    Eval (``training=False``, deterministic, no temperature): ``g = clip(σ(log α)(ζ − γ) + γ, 0,
    1)``.
    The L0 penalty is the expected number of open gates ``Σ σ(log α − β log(−γ/ζ))`` (summed over
    every entry of ``log_alpha``). For head gating multiply head ``i`` by ``g_i`` before the
    output projection: ``Concat_i(g_i · head_i) W^O``.

    Parameters
    ----------
    log_alpha : array
        ``log α``, one per gate (e.g. shape (h,) per layer).
    uniforms : array, optional
        Uniforms in ``[0, 1)`` whose shape broadcasts with ``log_alpha`` (e.g. (N, h) for one gate
        sample per batch element); the gate has the broadcast shape and the gradient is summed
        back to ``log_alpha``'s shape. Required when ``training``; ignored otherwise.
    beta, gamma, zeta : float
        Temperature and stretch interval; Louizos et al.'s defaults ``β = 2/3, γ = −0.1,
        ζ = 1.1``. The official code of Voita et al. (``lena-voita/the-story-of-heads``
        ``concrete_gate.py``) uses ``β = 0.33`` with the same ``(γ, ζ)`` and ``eps = 1e-6``.
    eps : float, default 1e-6
        Clamp of the uniforms (Voita et al.'s value).
    training : bool, default True
        Sample (``True``) or the deterministic test-time gate.
    hard : bool, default False
        Straight-through binarisation (Voita et al.'s option): forward ``1[g > 1/2]``, backward
        through ``g``.

    Returns
    -------
    gate : array
        ``g``, the broadcast shape of ``log_alpha`` and ``uniforms`` (``log_alpha``'s in eval).
    l0 : array, shape ()
        The L0 penalty (differentiable); add ``λ · l0`` to the loss.

    Notes
    -----
    ``∂g/∂log α = 1[0 < s̄ < 1] (ζ − γ) s (1 − s)/β`` (``/1`` in eval): exactly zero where the
    gate is clipped at 0 or 1; ``∂ l0/∂log α = σ'(log α − β log(−γ/ζ))``. Voita's code clips
    ``p_open`` to ``[eps, 1 − eps]`` before summing; here the penalty is the unclipped expectation.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> log_alpha = np.array([-3.0, 0.0, 3.0])        # three heads
    >>> u = rng.random((2, 3))                        # a gate sample per batch element
    >>> (g, l0), res = aa.hard_concrete_gate.fwd(log_alpha, u)
    >>> g.shape, bool(((g >= 0) & (g <= 1)).all())
    ((2, 3), True)
    >>> grads = aa.hard_concrete_gate.bwd(res, (np.ones_like(g), np.array(0.01)))
    >>> grads.log_alpha.shape
    (3,)
    >>> aa.hard_concrete_gate(log_alpha, training=False)[0].round(6).tolist()   # eval gates
    [0.0, 0.5, 1.0]
    """
    xp = checks.namespace(log_alpha=log_alpha, uniforms=uniforms)
    checks.check_floating(xp, "log_alpha", log_alpha)
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if not isinstance(hard, bool):
        raise TypeError(f"hard: expected a bool, got {type(hard).__name__}")
    beta, gamma, zeta = (
        checks.check_real(n, x) for n, x in (("beta", beta), ("gamma", gamma), ("zeta", zeta))
    )
    eps = checks.check_real("eps", eps)
    if beta <= 0:
        raise ValueError(f"beta: expected a temperature > 0, got {beta!r}")
    if not gamma < 0 < 1 < zeta:
        raise ValueError(
            f"gamma, zeta: expected gamma < 0 and zeta > 1, got gamma={gamma!r}, zeta={zeta!r}"
        )
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps: expected 0 <= eps < 0.5, got {eps!r}")
    if training:
        if uniforms is None:
            raise ValueError(
                "uniforms: required when training=True (the gate is sampled), got None"
            )
        checks.check_floating(xp, "uniforms", uniforms)
        if _broadcast_shape(tuple(log_alpha.shape), tuple(uniforms.shape)) is None:
            raise ValueError(
                "uniforms: expected a shape that broadcasts with log_alpha "
                f"{tuple(log_alpha.shape)}, "
                f"got {tuple(uniforms.shape)}"
            )
    else:
        uniforms = None
    return Call(
        xp,
        {"log_alpha": log_alpha, "uniforms": uniforms},
        ConcreteOptions(beta=beta, gamma=gamma, zeta=zeta, eps=eps, training=training, hard=hard),
        ("gate", "l0"),
    )

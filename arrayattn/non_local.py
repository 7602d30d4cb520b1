"""Non-local neural network block (Wang, Girshick, Gupta, He; CVPR 2018)."""

from __future__ import annotations

from . import _checks as checks
from ._glue.non_local import (
    NON_LOCAL_REFERENCE,
    NON_LOCAL_RESIDUALS,
    NonLocalOptions,
    example_params,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["non_local_block"]

_MODES = ("embedded_gaussian", "gaussian", "dot", "concat")


def _examples(rng):
    x = rng.standard_normal((2, 4, 4, 5))
    calls = []
    for mode in _MODES:
        p = example_params(rng, 4, 2, mode)
        if mode == "embedded_gaussian":
            del p["b_phi"]  # its gradient is exactly 0 (softmax shift invariance): nothing to check
        calls.append(((x, p), {"mode": mode}))
    calls.append(
        ((x, example_params(rng, 4, 3, "embedded_gaussian", bias=False)), {"subsample": True})
    )
    calls.append(
        (
            (x, example_params(rng, 4, 2, "gaussian")),
            {"mode": "gaussian", "subsample": True, "scale": 0.5},
        )
    )
    calls.append(((x, example_params(rng, 4, 2, "dot")), {"mode": "dot", "subsample": True}))
    calls.append(((x, example_params(rng, 4, 2, "concat")), {"mode": "concat", "subsample": True}))
    return calls


@op(
    differentiable=("x", "params"),
    reference=NON_LOCAL_REFERENCE,
    residuals=NON_LOCAL_RESIDUALS,
    examples=_examples,
)
def non_local_block(
    x: Array,
    params: dict[str, Array],
    *,
    mode: str = "embedded_gaussian",
    subsample: bool = False,
    scale: float | None = None,
) -> Call[Array]:
    r"""Non-local block (Wang et al., CVPR 2018, §3.2–3.3): ``z = W_z y + b_z + x``.

    ``y_i = (1/C(x)) Σ_j f(x_i, x_j) g(x_j)`` over all positions, with 1×1 convolutions
    ``θ(x) = W_θ x + b_θ``, ``φ(x) = W_φ x + b_φ``, ``g(x) = W_g x + b_g`` to ``C'`` channels:

    ===================== =============================================== ================
    ``mode``              ``f(x_i, x_j)``                                 ``C(x)``
    ===================== =============================================== ================
    ``embedded_gaussian`` ``exp(scale · θ(x_i)ᵀ φ(x_j))``                 ``Σ_j f`` (softmax)
    ``gaussian``          ``exp(scale · x_iᵀ x_j)`` (no θ, φ)             ``Σ_j f`` (softmax)
    ``dot``               ``θ(x_i)ᵀ φ(x_j)``                              ``P'``
    ``concat``            ``ReLU(w_fᵀ [θ(x_i); φ(x_j)])``                  ``P'``
    ===================== =============================================== ================

    where ``P'`` is the number of key positions ``j``.

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    params : mapping of str to array
        1×1 ``Conv2d`` layout ``(out, in, 1, 1)`` (as ``AlexHex7/Non-local_pytorch``, so weights
        port as is): ``w_g`` (C', C, 1, 1), ``w_z`` (C, C', 1, 1), and except in ``'gaussian'``
        mode ``w_theta``, ``w_phi`` (C', C, 1, 1); in ``'concat'`` mode ``w_f`` (1, 2C', 1, 1)
        (first C' input channels act on θ, the last C' on φ; no bias). Optional biases
        ``b_g``, ``b_theta``, ``b_phi`` (C',), ``b_z`` (C,). Other keys are an error.
    mode : {'embedded_gaussian', 'gaussian', 'dot', 'concat'}, default 'embedded_gaussian'
    subsample : bool, default False
        Max-pool φ and g with a 2×2 window, stride 2 (floor mode, like ``nn.MaxPool2d(2)``), so
        ``P' = ⌊H/2⌋·⌊W/2⌋``. In ``'gaussian'`` mode φ is the pooled ``x``.
    scale : float, optional
        Logit scale of the softmax modes; ``None`` means 1 (the paper and AlexHex7; timm uses
        ``C^{-1/2}``, the Caffe2 code ``C'^{-1/2}`` with ``USE_SCALE``). Not accepted for
        ``'dot'`` and ``'concat'``.

    Returns
    -------
    z : array, shape (N, C, H, W)

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``H, W`` spatial size, ``C'`` inner width (C/2 in
    the paper), ``P = H·W`` positions, ``P'`` key positions. The BatchNorm after ``W_z`` of the
    reference implementations is the caller's (fold an eval-mode BN into ``w_z``/``b_z``).

    Memory: the softmax modes run :func:`scaled_dot_product_attention` with ``q = θᵀ``,
    ``k = φᵀ``, ``v = gᵀ`` (tiled, O(P·C'), on the active backend); ``'dot'`` is computed as
    ``(G Φᵀ / P') Θ``, O(P·C'²) with no P×P' matrix; ``'concat'`` builds the dense (N, P, P')
    pairwise map in forward and backward, so it is meant for moderate ``P`` (a 64×64 map with
    subsampling is 4096×1024 per image). The ``P'`` divisor is a constant (the official code's
    stop-gradient). Subsampling max-pools route gradients to the first maximum of each window.
    The derivation is in *Non-local block: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> C, Ci = 8, 4
    >>> p = {k: rng.standard_normal((Ci, C, 1, 1)) / 3 for k in ("w_theta", "w_phi", "w_g")}
    >>> p["w_z"] = rng.standard_normal((C, Ci, 1, 1)) / 2
    >>> x = rng.standard_normal((2, C, 6, 6))
    >>> z, res = aa.non_local_block.fwd(x, p, subsample=True)
    >>> g = aa.non_local_block.bwd(res, np.ones_like(z))
    >>> z.shape, sorted(g.params)
    ((2, 8, 6, 6), ['w_g', 'w_phi', 'w_theta', 'w_z'])
    """
    xp = checks.image_block_namespace(x, params)
    checks.check_choice("mode", mode, _MODES)
    if not isinstance(subsample, bool):
        raise TypeError(f"subsample: expected a bool, got {type(subsample).__name__}")
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    if subsample and (h < 2 or w < 2):
        raise ValueError(f"x: subsample needs H >= 2 and W >= 2, got shape {tuple(x.shape)}")
    wg = params.get("w_g")
    if wg is None:
        raise ValueError("params: missing required key 'w_g'")
    if not hasattr(wg, "shape") or len(wg.shape) != 4:
        raise ValueError(
            f"params['w_g']: expected shape (C', {c}, 1, 1), got {getattr(wg, 'shape', wg)}"
        )
    ci = wg.shape[0]
    required = {"w_g": (ci, c, 1, 1), "w_z": (c, ci, 1, 1)}
    optional = {"b_g": (ci,), "b_z": (c,)}
    if mode != "gaussian":
        required.update(w_theta=(ci, c, 1, 1), w_phi=(ci, c, 1, 1))
        optional.update(b_theta=(ci,), b_phi=(ci,))
    if mode == "concat":
        required["w_f"] = (1, 2 * ci, 1, 1)
    clean = checks.check_params(params, required, optional)
    if mode in ("dot", "concat"):
        if scale is not None:
            raise ValueError(
                f"scale: only the softmax modes take a scale, got {scale!r} with mode={mode!r}"
            )
        scale = 1.0
    else:
        scale = 1.0 if scale is None else checks.check_real("scale", scale)
    return Call(
        xp, {"x": x, "params": clean}, NonLocalOptions(mode=mode, subsample=subsample, scale=scale)
    )

"""Luong global and local attention, Bahdanau additive attention: the public ops."""

from __future__ import annotations

from collections.abc import Mapping

from . import _checks as checks
from ._glue.luong import LUONG_REFERENCE, LUONG_RESIDUALS, LuongOptions
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["bahdanau_attention", "local_attention", "luong_attention"]

_SCORES = ("dot", "general", "concat", "location")
_LOCAL_SCORES = ("dot", "general", "concat")
_MODES = ("monotonic", "predictive")
_CENTERS = ("floor", "round")
_P_SCALES = ("S", "S-1")


# -- validation ------------------------------------------------------------------------------------


def _check_states(xp, t_name, h_t, s_name, h_s, t_legend, s_legend):
    for name, x, legend in ((t_name, h_t, t_legend), (s_name, h_s, s_legend)):
        checks.check_floating(xp, name, x)
        checks.check_ndim(name, x, 2, legend)
    checks.check_same_dtype(**{t_name: h_t, s_name: h_s})
    if tuple(h_s.shape[:-2]) != tuple(h_t.shape[:-2]):
        raise ValueError(
            f"{s_name}: expected leading dimensions {tuple(h_t.shape[:-2])} (from {t_name}), "
            f"got shape {tuple(h_s.shape)}"
        )
    if h_s.shape[-2] < 1:
        raise ValueError(
            f"{s_name}: expected at least one source position, got shape {tuple(h_s.shape)}"
        )


def _namespace(params, **arrays):
    return checks.namespace(**arrays, **checks.param_arrays({} if params is None else params))


def _matrix_rows(params, key: str, legend: str) -> int:
    """The first dimension of the 2-D parameter ``key`` (checked before its full shape is)."""
    w = params.get(key) if params is not None else None
    if w is None:
        raise ValueError(f"params: missing required key {key!r} ({legend})")
    if not hasattr(w, "shape") or len(w.shape) != 2:
        raise ValueError(
            f"params[{key!r}]: expected a 2-D {legend} weight, "
            f"got shape {getattr(w, 'shape', None)}"
        )
    return int(w.shape[0])


def _score_specs(score, params, d_t, d_s, s_len):
    """(required, optional) parameter shapes of a score function."""
    if score == "dot":
        if d_t != d_s:
            raise ValueError(
                f"h_s: score='dot' needs the width of h_t, d = {d_t}, got d_s = {d_s} "
                "(use score='general' for different widths)"
            )
        return {}, {}
    if score == "general":
        return {"w_a": (d_s, d_t)}, {}
    if score == "concat":
        d_a = _matrix_rows(params, "w_a", "(d_a, d_t + d_s)")
        return {"w_a": (d_a, d_t + d_s), "v_a": (d_a,)}, {"b_a": (d_a,)}
    s_max = _matrix_rows(params, "w_a", "(S_max, d_t)")
    if s_max < s_len:
        raise ValueError(
            f"params['w_a']: score='location' needs S_max >= S = {s_len} rows, got shape "
            f"{tuple(params['w_a'].shape)}"
        )
    return {"w_a": (s_max, d_t)}, {"b_a": (s_max,)}


def _check_all_params(params, required, optional, dtype_of):
    if not required:
        if params:
            raise ValueError(f"params: this score takes no parameters, got keys {sorted(params)}")
        return {}
    clean = checks.check_params({} if params is None else params, required, optional)
    checks.check_same_dtype(**dtype_of, **{f"params[{k!r}]": a for k, a in clean.items()})
    return clean


def _check_mask(xp, mask, h_t, s_len):
    if mask is None:
        return
    checks.check_bool(xp, "mask", mask)
    checks.check_broadcastable("mask", mask.shape, tuple(h_t.shape[:-1]) + (s_len,), "(..., T, S)")


# -- luong_attention -------------------------------------------------------------------------------


def _luong_examples(rng):
    t, s, d = 4, 6, 5
    h_t = rng.standard_normal((2, t, d))
    h_s = rng.standard_normal((2, s, d))
    mask = rng.random((2, 1, s)) > 0.3
    mask[0, 0, :] = True
    mask[1, 0, :] = False  # one fully masked source
    return [
        ((h_t, h_s), {}),
        ((h_t, h_s), {"mask": mask}),
        ((h_t, h_s, {"w_a": rng.standard_normal((d, d)) / 2}), {"score": "general"}),
        (
            (
                h_t,
                h_s,
                {
                    "w_a": rng.standard_normal((3, 2 * d)),
                    "v_a": rng.standard_normal(3),
                    "b_a": rng.standard_normal(3),
                },
            ),
            {"score": "concat", "mask": mask},
        ),
        (
            (h_t, h_s, {"w_a": rng.standard_normal((8, d)), "b_a": rng.standard_normal(8)}),
            {"score": "location"},
        ),
    ]


@op(
    differentiable=("h_t", "h_s", "params"),
    reference=LUONG_REFERENCE,
    residuals=LUONG_RESIDUALS,
    examples=_luong_examples,
)
def luong_attention(
    h_t: Array,
    h_s: Array,
    params: Mapping[str, Array] | None = None,
    *,
    score: str = "dot",
    mask: Array | None = None,
) -> Call[Array]:
    r"""Luong global attention (Luong, Pham, Manning 2015, §3.1): context and alignment weights.

    ``a_t = softmax_s(score(h_t, h̄_s))`` over the source positions ``mask`` keeps, and the
    context ``c_t = Σ_s a_t(s) h̄_s``, for every target step ``t`` at once.

    Parameters
    ----------
    h_t : array, shape (..., T, d_t)
        Target (decoder) states, the queries.
    h_s : array, shape (..., S, d_s)
        Source (encoder) states; same leading dimensions as ``h_t``.
    params : mapping of str to array, optional
        The score's weights, PyTorch ``Linear`` layout (out, in):

        - ``'dot'``: none (``d_t == d_s``);
        - ``'general'``: ``w_a`` (d_s, d_t); score ``(w_a h_t)ᵀ h̄_s`` — OpenNMT-py's
          ``linear_in`` applied to the query, i.e. the paper's ``W_a`` is ``w_aᵀ``;
        - ``'concat'``: ``w_a`` (d_a, d_t + d_s), ``v_a`` (d_a,), optional ``b_a`` (d_a,);
          score ``v_aᵀ tanh(w_a [h_t; h̄_s] + b_a)`` (the first ``d_t`` columns act on ``h_t``);
        - ``'location'``: ``w_a`` (S_max, d_t), optional ``b_a`` (S_max,), S_max >= S; score
          ``(w_a h_t + b_a)[s]`` for ``s < S`` (the rows past S are unused, gradient 0).
    score : {'dot', 'general', 'concat', 'location'}, default 'dot'
        The score function of §3.1. No ``1/sqrt(d)`` scale (the paper has none).
    mask : bool array, optional
        Broadcastable to (..., T, S); ``True`` = valid source position. For a per-sequence
        source padding mask of shape (..., S) pass ``mask[..., None, :]``.

    Returns
    -------
    context : array, shape (..., T, d_s)
        ``c_t``; 0 for a target step with no valid source position.
    weights : array, shape (..., T, S)
        The alignment ``a_t``; 0 at masked positions (a fully masked row is all 0).

    Notes
    -----
    Shape legend: ``...`` batch dimensions, ``T`` target steps, ``S`` source positions,
    ``d_t``/``d_s`` target/source state widths, ``d_a`` width of the concat score's hidden
    layer, ``S_max`` rows of the location score's weight. ``.bwd`` takes a tuple
    ``(dcontext, dweights)`` (``None`` for either) and returns gradients for ``h_t``, ``h_s``
    and every entry of ``params``. The ``concat`` scores are computed in chunks of target steps
    and backward recomputes ``tanh``, so no T×S×d_a tensor is stored. The attentional state
    ``h̃_t = tanh(W_c [c_t; h_t])`` of the paper is a plain Linear layer on the context and is
    left to the caller. Derivation: *Luong and Bahdanau attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> h_t = rng.standard_normal((2, 3, 8))                # (N, T, d) decoder states
    >>> h_s = rng.standard_normal((2, 5, 8))                # (N, S, d) encoder states
    >>> lengths = np.array([5, 2])
    >>> mask = (np.arange(5) < lengths[:, None])[:, None, :]   # (N, 1, S)
    >>> params = {"w_a": rng.standard_normal((8, 8)) / 8}
    >>> (c, a), res = aa.luong_attention.fwd(h_t, h_s, params, score="general", mask=mask)
    >>> c.shape, a.shape, bool(np.allclose(a.sum(-1), 1)), float(a[1, :, 2:].max())
    ((2, 3, 8), (2, 3, 5), True, 0.0)
    >>> g = aa.luong_attention.bwd(res, (np.ones_like(c), None))
    >>> g.h_t.shape, g.params["w_a"].shape
    ((2, 3, 8), (8, 8))
    """
    xp = _namespace(params, h_t=h_t, h_s=h_s, mask=mask)
    _check_states(xp, "h_t", h_t, "h_s", h_s, "(..., T, d_t)", "(..., S, d_s)")
    checks.check_choice("score", score, _SCORES)
    d_t, d_s, s_len = h_t.shape[-1], h_s.shape[-1], h_s.shape[-2]
    required, optional = _score_specs(score, params, d_t, d_s, s_len)
    clean = _check_all_params(params, required, optional, {"h_t": h_t})
    _check_mask(xp, mask, h_t, s_len)
    return Call(
        xp,
        {"h_t": h_t, "h_s": h_s, "params": clean, "mask": mask},
        LuongOptions(score=score, names=("h_t", "h_s")),
        ("context", "weights"),
    )


# -- bahdanau_attention ----------------------------------------------------------------------------


def _bahdanau_examples(rng):
    n, m, d_a = 4, 6, 3
    s_prev = rng.standard_normal((2, 3, n))
    h = rng.standard_normal((2, 5, m))
    params = {
        "w_a": rng.standard_normal((d_a, n)),
        "u_a": rng.standard_normal((d_a, m)),
        "v_a": rng.standard_normal(d_a),
    }
    mask = rng.random((2, 1, 5)) > 0.3
    mask[0, 0, 0] = True
    mask[1, 0, :] = False
    return [
        ((s_prev, h, params), {}),
        ((s_prev, h, dict(params, b_a=rng.standard_normal(d_a))), {"mask": mask}),
    ]


@op(
    differentiable=("s_prev", "h", "params"),
    reference=LUONG_REFERENCE,
    residuals=LUONG_RESIDUALS,
    examples=_bahdanau_examples,
)
def bahdanau_attention(
    s_prev: Array,
    h: Array,
    params: Mapping[str, Array],
    *,
    mask: Array | None = None,
) -> Call[Array]:
    r"""Bahdanau additive attention (Bahdanau, Cho, Bengio 2015, §3.1 and App. A.1.2).

    ``e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j + b_a)``, ``α_ij = softmax_j(e_ij)`` over the
    annotations ``mask`` keeps, ``c_i = Σ_j α_ij h_j`` — for every decoder step ``i`` at once
    (OpenNMT-py's ``mlp`` attention).

    Parameters
    ----------
    s_prev : array, shape (..., T, n)
        The *previous* decoder states ``s_{i-1}``, one per output step.
    h : array, shape (..., S, m)
        The annotations ``h_j`` (``m = 2n`` for the paper's bidirectional encoder; any ``m``
        works). Same leading dimensions as ``s_prev``.
    params : mapping of str to array
        PyTorch ``Linear`` layout: ``w_a`` (n', n), ``u_a`` (n', m), ``v_a`` (n',), optional
        ``b_a`` (n',) (the bias of OpenNMT-py's ``linear_query``).
    mask : bool array, optional
        Broadcastable to (..., T, S); ``True`` = valid annotation. For a padding mask of shape
        (..., S) pass ``mask[..., None, :]``.

    Returns
    -------
    context : array, shape (..., T, m)
        ``c_i``; 0 for a step with no valid annotation.
    weights : array, shape (..., T, S)
        ``α_ij``; 0 at masked positions.

    Notes
    -----
    Shape legend: ``...`` batch dimensions, ``T`` decoder steps, ``S`` source positions, ``n``
    decoder state width, ``m`` annotation width, ``n'`` hidden width of the alignment model.
    ``.bwd`` takes ``(dcontext, dweights)`` (``None`` for either) and returns gradients for
    ``s_prev``, ``h`` and every entry of ``params``. The T×S×n' pre-activations are never stored
    (chunked forward, ``tanh`` recomputed in backward).

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> s_prev = rng.standard_normal((2, 3, 4))             # (N, T, n)
    >>> h = rng.standard_normal((2, 6, 8))                  # (N, S, m = 2n)
    >>> params = {"w_a": rng.standard_normal((5, 4)), "u_a": rng.standard_normal((5, 8)),
    ...           "v_a": rng.standard_normal(5)}
    >>> (c, alpha), res = aa.bahdanau_attention.fwd(s_prev, h, params)
    >>> c.shape, alpha.shape
    ((2, 3, 8), (2, 3, 6))
    >>> g = aa.bahdanau_attention.bwd(res, (np.ones_like(c), None))
    >>> sorted(g.params), g.s_prev.shape
    (['u_a', 'v_a', 'w_a'], (2, 3, 4))
    """
    xp = _namespace(params, s_prev=s_prev, h=h, mask=mask)
    _check_states(xp, "s_prev", s_prev, "h", h, "(..., T, n)", "(..., S, m)")
    n, m = s_prev.shape[-1], h.shape[-1]
    d_a = _matrix_rows(params, "w_a", "(n', n)")
    clean = _check_all_params(
        params,
        {"w_a": (d_a, n), "u_a": (d_a, m), "v_a": (d_a,)},
        {"b_a": (d_a,)},
        {"s_prev": s_prev},
    )
    _check_mask(xp, mask, s_prev, h.shape[-2])
    return Call(
        xp,
        {"h_t": s_prev, "h_s": h, "params": clean, "mask": mask},
        LuongOptions(score="additive", names=("s_prev", "h")),
        ("context", "weights"),
    )


# -- local_attention -------------------------------------------------------------------------------


def _local_examples(rng):
    t, s, d, d_p = 4, 9, 5, 3
    h_t = rng.standard_normal((2, t, d))
    h_s = rng.standard_normal((2, s, d))
    pred = {"w_p": rng.standard_normal((d_p, d)), "v_p": rng.standard_normal(d_p)}
    mask = rng.random((2, 1, s)) > 0.2
    return [
        ((h_t, h_s), {"window": 2}),
        ((h_t, h_s), {"window": 1, "offset": 3, "mask": mask}),
        ((h_t, h_s, pred), {"window": 2, "mode": "predictive"}),
        (
            (h_t, h_s, dict(pred, w_a=rng.standard_normal((d, d)) / 2)),
            {"window": 3, "mode": "predictive", "score": "general", "center": "round"},
        ),
        (
            (h_t, h_s, dict(pred, w_a=rng.standard_normal((3, 2 * d)), v_a=rng.standard_normal(3))),
            {"window": 2, "mode": "predictive", "score": "concat", "p_scale": "S-1", "mask": mask},
        ),
    ]


@op(
    differentiable=("h_t", "h_s", "params"),
    reference=LUONG_REFERENCE,
    residuals=LUONG_RESIDUALS,
    examples=_local_examples,
)
def local_attention(
    h_t: Array,
    h_s: Array,
    params: Mapping[str, Array] | None = None,
    *,
    window: int,
    mode: str = "monotonic",
    score: str = "dot",
    mask: Array | None = None,
    offset: int = 0,
    center: str = "floor",
    p_scale: str = "S",
    index_base: int = 0,
) -> Call[Array]:
    r"""Luong local attention (Luong, Pham, Manning 2015, §3.2): local-m and local-p.

    Target step ``t`` attends to the source positions of the window ``[p_t - D, p_t + D]``
    (``D = window``) that lie inside ``[0, S-1]`` and that ``mask`` keeps; positions outside the
    sentence are excluded from the softmax, not zero-filled. With
    ``align_t(s) = softmax_{s ∈ window}(score(h_t, h̄_s))``:

    - ``mode='monotonic'`` (local-m): ``p_t = offset + t`` and ``a_t(s) = align_t(s)``;
    - ``mode='predictive'`` (local-p): ``p_t = scale · sigmoid(v_pᵀ tanh(W_p h_t))`` and
      ``a_t(s) = align_t(s) · exp(-(s - p_t)² / (2σ²))``, ``σ = D/2``, **not** renormalised
      (the weights sum to less than 1). Gradients flow through ``p_t`` (the choice of the
      integer window is piecewise constant and has none).

    The context is ``c_t = Σ_s a_t(s) h̄_s``.

    Parameters
    ----------
    h_t : array, shape (..., T, d_t)
        Target states.
    h_s : array, shape (..., S, d_s)
        Source states; same leading dimensions as ``h_t``.
    params : mapping of str to array, optional
        The score's weights as in :func:`luong_attention` (``'general'``: ``w_a`` (d_s, d_t);
        ``'concat'``: ``w_a`` (d_a, d_t + d_s), ``v_a`` (d_a,), optional ``b_a``), and for
        ``mode='predictive'`` ``w_p`` (d_p, d_t) and ``v_p`` (d_p,) (Linear layout, no bias).
    window : int
        ``D >= 0`` (``>= 1`` for local-p, where σ = D/2); the window holds ``2D + 1`` positions.
    mode : {'monotonic', 'predictive'}, default 'monotonic'
        local-m or local-p.
    score : {'dot', 'general', 'concat'}, default 'dot'
        The content score inside the window (``'location'`` has no meaning here).
    mask : bool array, optional
        Broadcastable to (..., T, S); ``True`` = valid source position; intersected with the
        window.
    offset : int, default 0
        local-m only: the (0-based) source position of the first target step, ``p_t = offset
        + t``; use it when decoding one step (``T = 1``) at a time: ``offset = t``.
    center : {'floor', 'round'}, default 'floor'
        local-p: the integer window centre, ``floor(p_t)`` (OpenNMT) or ``floor(p_t + 0.5)``.
    p_scale : {'S', 'S-1'}, default 'S'
        local-p: the factor of the sigmoid; ``'S'`` is the paper's ``p_t ∈ [0, S]``,
        ``'S-1'`` maps ``p_t`` onto ``[0, S-1]``, exactly the 0-based positions.
    index_base : {0, 1}, default 0
        local-p: the number of the first source position in which ``p_t`` is read; with 1
        (the paper's 1-based positions) the 0-based centre is ``p_t - 1``.

    Returns
    -------
    context : array, shape (..., T, d_s)
    weights : array, shape (..., T, S)
        ``a_t`` as a dense row: 0 outside the window and at masked positions. A step whose
        window holds no valid position has weights and context 0.

    Notes
    -----
    Shape legend: ``...`` batch dimensions, ``T`` target steps, ``S`` source positions,
    ``d_t``/``d_s`` state widths, ``d_a`` concat hidden width, ``d_p`` width of the position
    network, ``D`` the window radius. Positions are 0-based: source position ``s`` is row
    ``h_s[..., s, :]`` and the Gaussian uses ``(s - (p_t - index_base))``. ``.bwd`` takes
    ``(dcontext, dweights)`` and returns gradients for ``h_t``, ``h_s`` and ``params``
    (local-p: through the Gaussian into ``p_t``, ``v_p``, ``w_p`` and ``h_t``). The dense
    weights are the output contract; the ``numba`` kernel evaluates scores only inside the
    window. The conventions are justified in *Luong and Bahdanau attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> h_t = rng.standard_normal((1, 4, 6))
    >>> h_s = rng.standard_normal((1, 10, 6))
    >>> c, a = aa.local_attention(h_t, h_s, window=1)            # local-m
    >>> np.nonzero(a[0, 0])[0], np.nonzero(a[0, 3])[0]
    (array([0, 1]), array([2, 3, 4]))
    >>> params = {"w_p": rng.standard_normal((3, 6)), "v_p": rng.standard_normal(3)}
    >>> (c, a), res = aa.local_attention.fwd(h_t, h_s, params, window=2, mode="predictive")
    >>> bool((a.sum(-1) < 1).all())
    True
    >>> g = aa.local_attention.bwd(res, (np.ones_like(c), None))
    >>> sorted(g.params)
    ['v_p', 'w_p']
    """
    xp = _namespace(params, h_t=h_t, h_s=h_s, mask=mask)
    _check_states(xp, "h_t", h_t, "h_s", h_s, "(..., T, d_t)", "(..., S, d_s)")
    checks.check_choice("mode", mode, _MODES)
    checks.check_choice("score", score, _LOCAL_SCORES)
    checks.check_choice("center", center, _CENTERS)
    checks.check_choice("p_scale", p_scale, _P_SCALES)
    checks.check_choice("index_base", index_base, (0, 1))
    radius = checks.check_int("window", window, minimum=1 if mode == "predictive" else 0)
    offset = checks.check_int("offset", offset)
    d_t, d_s, s_len = h_t.shape[-1], h_s.shape[-1], h_s.shape[-2]
    required, optional = _score_specs(score, params, d_t, d_s, s_len)
    if mode == "predictive":
        d_p = _matrix_rows(params, "w_p", "(d_p, d_t)")
        required = dict(required, w_p=(d_p, d_t), v_p=(d_p,))
    clean = _check_all_params(params, required, optional, {"h_t": h_t})
    _check_mask(xp, mask, h_t, s_len)
    return Call(
        xp,
        {"h_t": h_t, "h_s": h_s, "params": clean, "mask": mask},
        LuongOptions(
            score=score,
            names=("h_t", "h_s"),
            mode=mode,
            window=radius,
            offset=offset,
            center=center,
            p_scale=p_scale,
            index_base=index_base,
        ),
        ("context", "weights"),
    )

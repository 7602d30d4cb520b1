"""Co-attention between two inputs: COSNet, CoDA and CAN's cross attention."""

from __future__ import annotations

from . import _checks as checks
from ._glue.co_attention import (
    CAN_REFERENCE,
    CAN_RESIDUALS,
    COATTN_REFERENCE,
    COATTN_RESIDUALS,
    CODA_REFERENCE,
    CODA_RESIDUALS,
    CanOptions,
    CoattnOptions,
    CodaOptions,
    example_can_params,
    example_coattn_params,
    example_coda_params,
)
from ._kernel import Call
from ._op import op
from ._xp import Array

__all__ = ["co_attention", "coda", "cross_attention_fewshot"]

_SECOND = ("paper", "code")


def _start(params, **arrays):
    pa = checks.param_arrays(params)
    xp = checks.namespace(**arrays, **pa)
    for name, a in arrays.items():
        checks.check_floating(xp, name, a)
    checks.check_same_dtype(**arrays, **pa)
    return xp


def _same_lead(name_a, a, name_b, b, axes, legend):
    for ax in axes:
        if a.shape[ax] != b.shape[ax]:
            raise ValueError(
                f"{name_b}: expected {legend} matching {name_a} {tuple(a.shape)}, got shape "
                f"{tuple(b.shape)}"
            )


# -- COSNet co-attention --------------------------------------------------------------------------


def _coattn_examples(rng):
    a = rng.standard_normal((2, 4, 3, 3))
    b = rng.standard_normal((2, 4, 2, 5))
    return [
        ((a, b, example_coattn_params(rng, 4, bias=True)), {}),
        ((a, b, example_coattn_params(rng, 4)), {"second_softmax": "code"}),
    ]


@op(
    differentiable=("v_a", "v_b", "params"),
    reference=COATTN_REFERENCE,
    residuals=COATTN_RESIDUALS,
    examples=_coattn_examples,
)
def co_attention(
    v_a: Array, v_b: Array, params: dict[str, Array], *, second_softmax: str = "paper"
) -> Call[Array]:
    r"""COSNet gated co-attention (Lu et al., CVPR 2019, §3.2) between an exemplar and a query.

    With ``V_a`` (C, Pa), ``V_b`` (C, Pb): ``S = V_bᵀ W V_a`` (Pb×Pa), ``Z_a = V_b S^c`` with
    ``S^c = softmax(S)`` column-wise (over the query positions), ``Z_b = V_a S^r`` with
    ``S^r = softmax(Sᵀ)`` column-wise (over the exemplar positions); each is gated,
    ``Z ⊙ σ(w_g · Z + b_g)`` (one gate value per position, shared weights).

    Parameters
    ----------
    v_a : array, shape (N, C, Ha, Wa)
        Exemplar features (``exemplar`` / ``input1`` in the official code).
    v_b : array, shape (N, C, Hb, Wb)
        Query features (``query`` / ``input2``).
    params : mapping of str to array
        In the layouts of the official modules, so weights port as is: ``w`` (C, C), the
        ``nn.Linear`` weight of ``linear_e`` (its ``x Wᵀ`` gives ``Sᵀ = V_aᵀ Wᵀ V_b``);
        ``w_gate`` (1, C, 1, 1), the 1×1 ``nn.Conv2d`` weight of ``gate``; optional
        ``b_gate`` (1,) (the paper's ``b_f``; the code has no bias).
    second_softmax : {'paper', 'code'}, default 'paper'
        ``'paper'``: ``S^c = softmax(S)``, a softmax of the affinities (also what later versions
        of ``siamese_model_conf.py`` compute). ``'code'``: ``carrierlxk/COSNet`` at commit
        a5e929ac, where ``A = softmax(Sᵀ, dim=1)`` overwrites the affinities and
        ``B = softmax(Aᵀ, dim=1)`` is a softmax **of probabilities** (nearly uniform).

    Returns
    -------
    z_a : array, shape (N, C, Ha, Wa)
        Gated attention summary for the exemplar (the code's ``input1_att`` before the concat).
    z_b : array, shape (N, C, Hb, Wb)
        Gated attention summary for the query (``input2_att``).

    Notes
    -----
    Shape legend: ``N`` batch, ``C`` channels, ``Pa = Ha·Wa`` exemplar and ``Pb = Hb·Wb`` query
    positions. In ``'paper'`` mode, up to 2²² pairs ``Pa·Pb`` per item, both softmaxes are taken
    of one dense (N, Pb, Pa) affinity map, as the official code does; beyond, they are
    :func:`scaled_dot_product_attention` cores (``scale=1``; ``Z_a``: q = W a, k = v = b;
    ``Z_b``: q = b, k = W a, v = a) on the active backend, O(P·C) memory. ``'code'`` mode
    always materialises the map. The concat with
    the input, 3×3 conv, BN and ReLU of the official model are the caller's. Derivation in
    *Co-attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> C = 8
    >>> p = {"w": rng.standard_normal((C, C)) / 3, "w_gate": rng.standard_normal((1, C, 1, 1)) / 3}
    >>> a, b = rng.standard_normal((2, C, 4, 4)), rng.standard_normal((2, C, 3, 5))
    >>> (za, zb), res = aa.co_attention.fwd(a, b, p)
    >>> g = aa.co_attention.bwd(res, (np.ones_like(za), None))
    >>> za.shape, zb.shape, g.v_b.shape, sorted(g.params)
    ((2, 8, 4, 4), (2, 8, 3, 5), (2, 8, 3, 5), ['w', 'w_gate'])
    """
    xp = _start(params, v_a=v_a, v_b=v_b)
    checks.check_ndim("v_a", v_a, 4, "(N, C, Ha, Wa)", exact=True)
    checks.check_ndim("v_b", v_b, 4, "(N, C, Hb, Wb)", exact=True)
    _same_lead("v_a", v_a, "v_b", v_b, (0, 1), "N and C")
    checks.check_choice("second_softmax", second_softmax, _SECOND)
    c = v_a.shape[1]
    clean = checks.check_params(params, {"w": (c, c), "w_gate": (1, c, 1, 1)}, {"b_gate": (1,)})
    return Call(
        xp,
        {"v_a": v_a, "v_b": v_b, "params": clean},
        CoattnOptions(second_softmax=second_softmax),
        ("z_a", "z_b"),
    )


# -- CoDA -----------------------------------------------------------------------------------------


def _coda_examples(rng):
    a, b = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 3, 5))
    return [
        ((a, b, example_coda_params(rng, 5, 3)), {}),
        ((a, b, example_coda_params(rng, 5, 2, bias=False, scalars=False)), {"centering": True}),
    ]


@op(
    differentiable=("a", "b", "params"),
    reference=CODA_REFERENCE,
    residuals=CODA_RESIDUALS,
    examples=_coda_examples,
)
def coda(a: Array, b: Array, params: dict[str, Array], *, centering: bool = False) -> Call[Array]:
    r"""Compositional de-attention (CoDA; Tay et al., NeurIPS 2019, §2): quasi-attention, no
    softmax.

    ``E_ij = α F_E(a_i)ᵀ F_E(b_j)``, ``N_ij = −β ‖F_N(a_i) − F_N(b_j)‖₁``,
    ``M = tanh(E) ⊙ σ(N)`` ∈ (−1, 1) (add / subtract / nullify), ``A' = M B``, ``B' = Mᵀ A``,
    with linear maps ``F_E(x) = W_E x + b_E``, ``F_N(x) = W_N x + b_N``.

    Parameters
    ----------
    a : array, shape (..., La, d)
    b : array, shape (..., Lb, d)
        Same leading dimensions as ``a``.
    params : mapping of str to array
        PyTorch ``Linear`` layout: ``w_e`` (k, d), ``w_n`` (k_n, d); optional ``b_e`` (k,),
        ``b_n`` (k_n,) (accepted for porting, but it cancels in ``F_N(a_i) − F_N(b_j)``: its
        gradient is 0); optional learnable scalars ``alpha`` (1,), ``beta`` (1,) (1 when absent).
    centering : bool, default False
        Subtract the mean of ``N`` over all (i, j) of each item before the sigmoid, so that
        ``σ(N)`` is centred on 1/2 rather than confined to (0, 1/2]. The paper mentions centring
        without a verified formula (a documented decision); this is the library's choice, off
        by default.

    Returns
    -------
    a_out : array, shape (..., La, d)
        ``A' = M B``: each ``a_i`` pooled from ``B``.
    b_out : array, shape (..., Lb, d)
        ``B' = Mᵀ A``.

    Notes
    -----
    Shape legend: ``...`` batch dimensions, ``La``/``Lb`` lengths, ``d`` width, ``k``/``k_n``
    projection widths. ``M`` is dense (La×Lb). The ``array_api`` reference computes the L1
    distances through an (..., La, Lb, k_n) intermediate; the ``numba`` kernel fuses them (extra
    memory O(La·Lb) per item) and runs each item in one pass, items in parallel. The L1
    subgradient at a tie ``F_N(a_i)_t = F_N(b_j)_t`` is 0. ``‖F_N(a_i) − F_N(b_j)‖₁`` grows with
    ``k_n``: without centring, a ``β`` much larger than ``1/k_n`` drives ``σ(N)`` towards 0 (and
    float32 into subnormals, which are slow on CPUs). No official code is known. Derivation in
    *Co-attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> p = {"w_e": rng.standard_normal((4, 6)), "w_n": rng.standard_normal((4, 6)),
    ...      "beta": np.array([0.5])}
    >>> a, b = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 7, 6))
    >>> (a2, b2), res = aa.coda.fwd(a, b, p)
    >>> g = aa.coda.bwd(res, (np.ones_like(a2), np.ones_like(b2)))
    >>> a2.shape, b2.shape, sorted(g.params)
    ((2, 5, 6), (2, 7, 6), ['beta', 'w_e', 'w_n'])
    """
    xp = _start(params, a=a, b=b)
    checks.check_ndim("a", a, 2, "(..., La, d)")
    checks.check_ndim("b", b, 2, "(..., Lb, d)")
    if b.ndim != a.ndim or tuple(b.shape[:-2]) != tuple(a.shape[:-2]) or b.shape[-1] != a.shape[-1]:
        raise ValueError(
            "b: expected shape (..., Lb, d) with the leading dimensions and d of a "
            f"{tuple(a.shape)}, "
            f"got {tuple(b.shape)}"
        )
    if not isinstance(centering, bool):
        raise TypeError(f"centering: expected a bool, got {type(centering).__name__}")
    d = a.shape[-1]
    sizes = {}
    for key in ("w_e", "w_n"):
        w = params.get(key)
        if w is None:
            raise ValueError(f"params: missing required key {key!r}")
        if not hasattr(w, "shape") or len(w.shape) != 2:
            raise ValueError(
                f"params[{key!r}]: expected shape (k, {d}), got {getattr(w, 'shape', w)}"
            )
        sizes[key] = w.shape[0]
    clean = checks.check_params(
        params,
        {"w_e": (sizes["w_e"], d), "w_n": (sizes["w_n"], d)},
        {"b_e": (sizes["w_e"],), "b_n": (sizes["w_n"],), "alpha": (1,), "beta": (1,)},
    )
    return Call(
        xp, {"a": a, "b": b, "params": clean}, CodaOptions(centering=centering), ("a_out", "b_out")
    )


# -- CAN cross attention ---------------------------------------------------------------------------


def _can_examples(rng):
    fp, fq = rng.standard_normal((2, 5, 2, 3)), rng.standard_normal((2, 5, 2, 3))
    return [
        ((fp, fq, example_can_params(rng, 6, 2)), {"tau": 0.5}),
        ((fp, fq, example_can_params(rng, 6, 1, bias=False)), {}),
    ]


@op(
    differentiable=("p", "q", "params"),
    reference=CAN_REFERENCE,
    residuals=CAN_RESIDUALS,
    examples=_can_examples,
)
def cross_attention_fewshot(
    p: Array, q: Array, params: dict[str, Array], *, tau: float = 0.025
) -> Call[Array]:
    r"""Cross attention module of CAN (Hou et al., NeurIPS 2019) for few-shot classification.

    Correlation ``R_ij = ⟨P_i/‖P_i‖, Q_j/‖Q_j‖⟩`` (cosine, m×m). For the class feature: a
    meta-fusion kernel ``w = W2 ReLU(W1 GAP_i(R) + b1) + b2`` (over the query positions j),
    ``A^p_i = softmax_i(mean_j(R_ij w_j) / τ)`` and ``P̄ = P ⊙ (1 + A^p)``; the query feature
    likewise with ``Rᵀ`` and the same kernel net. Exactly ``CAM.forward`` of
    ``blue-blue272/fewshot-CAN`` (``torchFewShot/models/cam.py``) for one (class, query) pair,
    without the BatchNorm of ``conv1``.

    Parameters
    ----------
    p : array, shape (N, C, H, W)
        Class (support) features; ``N`` indexes the (class, query) pairs.
    q : array, shape (N, C, H, W)
        Query features paired with ``p``.
    params : mapping of str to array
        1×1 ``Conv2d`` layout as ``CAM.conv1.conv`` / ``CAM.conv2``: ``w1`` (m_h, m, 1, 1),
        ``w2`` (m, m_h, 1, 1), optional ``b1`` (m_h,), ``b2`` (m,). The official ``conv1``
        is followed by a BatchNorm: fold its eval-mode statistics into ``w1``/``b1``.
    tau : float, default 0.025
        Softmax temperature (the official code's 0.025).

    Returns
    -------
    p_out : array, shape (N, C, H, W)
        ``P ⊙ (1 + A^p)``.
    q_out : array, shape (N, C, H, W)
        ``Q ⊙ (1 + A^q)``.

    Notes
    -----
    Shape legend: ``N`` pairs, ``C`` channels, ``H, W`` spatial size, ``m = H·W`` positions (36 in
    the paper, 6×6 maps), ``m_h`` hidden width (m/6). Features are L2-normalised over channels
    with ``F.normalize``'s ``max(‖x‖, 1e-12)``. ``τ = 0.025`` makes the softmax very peaked; it is
    computed stably in at least float32. The (N, m, m) correlation is dense (m is small).
    Derivation in *Co-attention: backward*.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> prm = {"w1": rng.standard_normal((6, 36, 1, 1)) / 6,
    ...        "w2": rng.standard_normal((36, 6, 1, 1)) / 3}
    >>> fp, fq = rng.standard_normal((10, 64, 6, 6)), rng.standard_normal((10, 64, 6, 6))
    >>> (p2, q2), res = aa.cross_attention_fewshot.fwd(fp, fq, prm)
    >>> g = aa.cross_attention_fewshot.bwd(res, (np.ones_like(p2), np.ones_like(q2)))
    >>> p2.shape, sorted(g.params)
    ((10, 64, 6, 6), ['w1', 'w2'])
    """
    xp = _start(params, p=p, q=q)
    checks.check_ndim("p", p, 4, "(N, C, H, W)", exact=True)
    checks.check_ndim("q", q, 4, "(N, C, H, W)", exact=True)
    if tuple(q.shape) != tuple(p.shape):
        raise ValueError(f"q: expected the shape of p {tuple(p.shape)}, got {tuple(q.shape)}")
    m = p.shape[2] * p.shape[3]
    w1 = params.get("w1")
    if w1 is None:
        raise ValueError("params: missing required key 'w1'")
    if not hasattr(w1, "shape") or len(w1.shape) != 4:
        raise ValueError(
            f"params['w1']: expected shape (m_h, {m}, 1, 1), got {getattr(w1, 'shape', w1)}"
        )
    mh = w1.shape[0]
    clean = checks.check_params(
        params, {"w1": (mh, m, 1, 1), "w2": (m, mh, 1, 1)}, {"b1": (mh,), "b2": (m,)}
    )
    tau = checks.check_real("tau", tau)
    if tau <= 0:
        raise ValueError(f"tau: expected a positive temperature, got {tau!r}")
    return Call(xp, {"p": p, "q": q, "params": clean}, CanOptions(tau=tau), ("p_out", "q_out"))

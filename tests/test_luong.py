"""Luong global/local and Bahdanau attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import RTOL, assert_close_rel, require_kernel, to_numpy, to_xp

# -- dense float64 oracle, written loop by loop from the spec formulas -----------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _score(kind, p, ht, hs, s):
    """score(h_t, h̄_s) of Luong §3.1 / Bahdanau §3.1 for one pair."""
    if kind == "dot":
        return ht @ hs
    if kind == "general":  # paper h_tᵀ W_a h̄_s with W_a = w_aᵀ (OpenNMT linear_in on the query)
        return ht @ p["w_a"].T @ hs
    if kind == "concat":
        return p["v_a"] @ np.tanh(p["w_a"] @ np.concatenate([ht, hs]) + p.get("b_a", 0.0))
    if kind == "location":
        return (p["w_a"] @ ht + p.get("b_a", 0.0))[s]
    return p["v_a"] @ np.tanh(p["w_a"] @ ht + p["u_a"] @ hs + p.get("b_a", 0.0))  # Bahdanau


def oracle(h_t, h_s, params=None, *, kind="dot", mask=None, local=None):
    """(context, weights) by explicit loops over (batch, t, s)."""
    h_t, h_s = np.asarray(h_t, np.float64), np.asarray(h_s, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in (params or {}).items()}
    lead, (t_len, s_len) = h_t.shape[:-2], (h_t.shape[-2], h_s.shape[-2])
    keep = np.ones(lead + (t_len, s_len), bool)
    if mask is not None:
        keep = keep & np.broadcast_to(mask, keep.shape)
    ht = h_t.reshape(-1, t_len, h_t.shape[-1])
    hs = h_s.reshape(-1, s_len, h_s.shape[-1])
    keep = keep.reshape(-1, t_len, s_len)
    weights = np.zeros(keep.shape)
    for b in range(ht.shape[0]):
        for t in range(t_len):
            window = np.arange(s_len)
            gauss = np.ones(s_len)
            if local is not None:
                radius = local["window"]
                if local.get("mode", "monotonic") == "monotonic":
                    centre = local.get("offset", 0) + t
                else:
                    scale = s_len if local.get("p_scale", "S") == "S" else s_len - 1
                    p_t = scale * _sigmoid(p["v_p"] @ np.tanh(p["w_p"] @ ht[b, t]))
                    pos = p_t - local.get("index_base", 0)
                    centre = math.floor(
                        pos if local.get("center", "floor") == "floor" else pos + 0.5
                    )
                    sigma = radius / 2
                    gauss = np.exp(-((np.arange(s_len) - pos) ** 2) / (2 * sigma**2))
                window = [s for s in range(centre - radius, centre + radius + 1) if 0 <= s < s_len]
            valid = [s for s in window if keep[b, t, s]]
            if not valid:
                continue
            z = np.array([_score(kind, p, ht[b, t], hs[b, s], s) for s in valid])
            e = np.exp(z - z.max())
            for s, a in zip(valid, e / e.sum(), strict=True):
                weights[b, t, s] = a * gauss[s]
    context = weights @ hs
    return context.reshape(lead + (t_len, h_s.shape[-1])), weights.reshape(lead + (t_len, s_len))


def _params(rng, kind, d_t, d_s, *, s_max=None, d_a=3, bias=True):
    if kind == "dot":
        return None
    if kind == "general":
        return {"w_a": rng.standard_normal((d_s, d_t)) / 2}
    if kind == "concat":
        p = {"w_a": rng.standard_normal((d_a, d_t + d_s)), "v_a": rng.standard_normal(d_a)}
    elif kind == "location":
        p = {"w_a": rng.standard_normal((s_max, d_t))}
        if bias:
            p["b_a"] = rng.standard_normal(s_max)
        return p
    else:
        p = {
            "w_a": rng.standard_normal((d_a, d_t)),
            "u_a": rng.standard_normal((d_a, d_s)),
            "v_a": rng.standard_normal(d_a),
        }
    if bias:
        p["b_a"] = rng.standard_normal(d_a)
    return p


def _run(kind, h_t, h_s, params, mask=None, local=None):
    if kind == "additive":
        return aa.bahdanau_attention(h_t, h_s, params, mask=mask)
    if local is not None:
        return aa.local_attention(h_t, h_s, params, score=kind, mask=mask, **local)
    return aa.luong_attention(h_t, h_s, params, score=kind, mask=mask)


def _op_and_args(kind, h_t, h_s, params, mask=None, local=None):
    if kind == "additive":
        return aa.bahdanau_attention, (h_t, h_s, params), {"mask": mask}
    if local is not None:
        return aa.local_attention, (h_t, h_s, params), dict(local, score=kind, mask=mask)
    return aa.luong_attention, (h_t, h_s, params), {"score": kind, "mask": mask}


def _skip_unsupported(backend, op, args, kwargs):
    """Skip when the selected backend has no kernel for this call (it would raise BackendError)."""
    for line in op.explain(*args, **kwargs).splitlines():
        name, _, verdict = line.strip().partition(": ")
        if name == backend and verdict != "eligible":
            pytest.skip(f"{backend}: {verdict}")


GLOBAL_KINDS = ("dot", "general", "concat", "location", "additive")


def _inputs(rng, kind, lead=(2,), t=3, s=5, d_t=4, d_s=4, masked=True):
    if kind == "dot":
        d_s = d_t
    h_t = rng.standard_normal(lead + (t, d_t))
    h_s = rng.standard_normal(lead + (s, d_s))
    params = _params(rng, kind, d_t, d_s, s_max=s + 2)
    mask = None
    if masked:
        mask = rng.random(lead + (1, s)) > 0.3
        mask[..., 0, 1] = True
    return h_t, h_s, params, mask


# -- forward against the oracle ------------------------------------------------------------------


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_global_forward_matches_oracle(xp, kind, masked, rng):
    d_s = 4 if kind == "dot" else 6  # general/concat/additive: different widths
    h_t, h_s, params, mask = _inputs(rng, kind, lead=(2, 3), d_s=d_s, masked=masked)
    c, a = _run(kind, to_xp(xp, h_t), to_xp(xp, h_s), to_xp(xp, params), to_xp(xp, mask))
    c_ref, a_ref = oracle(h_t, h_s, params, kind=kind, mask=mask)
    assert_close_rel(c, c_ref, 1e-12, "context")
    assert_close_rel(a, a_ref, 1e-12, "weights")


LOCAL_CASES = [
    ("dot", {"window": 0}),
    ("dot", {"window": 1}),
    ("dot", {"window": 2, "offset": 4}),
    ("general", {"window": 10}),  # the window covers the sentence
    ("dot", {"window": 2, "mode": "predictive"}),
    ("general", {"window": 1, "mode": "predictive", "center": "round"}),
    ("concat", {"window": 2, "mode": "predictive", "p_scale": "S-1"}),
    ("dot", {"window": 3, "mode": "predictive", "index_base": 1, "center": "round"}),
]


@pytest.mark.parametrize(("kind", "local"), LOCAL_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_local_forward_matches_oracle(xp, kind, local, masked, rng):
    h_t, h_s, params, mask = _inputs(rng, kind, t=5, s=8, masked=masked)
    if local.get("mode") == "predictive":
        params = dict(params or {}, w_p=rng.standard_normal((3, 4)), v_p=rng.standard_normal(3))
    c, a = _run(kind, to_xp(xp, h_t), to_xp(xp, h_s), to_xp(xp, params), to_xp(xp, mask), local)
    c_ref, a_ref = oracle(h_t, h_s, params, kind=kind, mask=mask, local=local)
    assert_close_rel(c, c_ref, 1e-12, "context")
    assert_close_rel(a, a_ref, 1e-12, "weights")


def test_local_monotonic_window_is_exact(rng):
    """local-m: 0-based p_t = offset + t; out-of-sentence positions are excluded, so rows sum to
    1."""
    h_t, h_s = rng.standard_normal((6, 3)), rng.standard_normal((7, 3))
    _, a = aa.local_attention(h_t, h_s, window=1, offset=1)
    support = [tuple(np.nonzero(row)[0]) for row in a]
    assert support == [(0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 6), (5, 6)]
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-14)


def test_local_predictive_not_renormalised(rng):
    h_t, h_s = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 9, 5))
    params = {"w_p": rng.standard_normal((3, 5)), "v_p": rng.standard_normal(3)}
    _, a = aa.local_attention(h_t, h_s, params, window=2, mode="predictive")
    assert np.all(a.sum(-1) < 1)
    assert np.all(a.sum(-1) > 0)
    assert np.all(np.count_nonzero(a, axis=-1) <= 5)


def test_local_equals_global_when_window_covers(rng):
    h_t, h_s, params, mask = _inputs(rng, "general", t=4, s=5)
    g = aa.luong_attention(h_t, h_s, params, score="general", mask=mask)
    loc = aa.local_attention(h_t, h_s, params, score="general", mask=mask, window=9)
    for x, y in zip(g, loc, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-14, atol=1e-15)


# -- gradients against finite differences ----------------------------------------------------------


def _loss_fd_check(op, args, kwargs, rng, rtol=1e-6):
    """Elementwise central differences of Σ <ct, outputs> for every differentiable argument."""
    (c, a), res = op.fwd(*args, **kwargs)
    cts = (rng.standard_normal(c.shape), rng.standard_normal(a.shape))
    grads = op.bwd(res, cts)
    names = op.differentiable

    def loss(new_args):
        c2, a2 = op(*new_args, **kwargs)
        return float(np.sum(c2 * cts[0]) + np.sum(a2 * cts[1]))

    for i, name in enumerate(names):
        value = args[i]
        if value is None:
            continue
        leaves = value.items() if isinstance(value, dict) else [(None, value)]
        for key, x in leaves:

            def f(xn, i=i, key=key):
                new = list(args)
                new[i] = xn if key is None else {**args[i], key: xn}
                return loss(new)

            fd = numerical_gradient(f, x)
            g = getattr(grads, name) if key is None else getattr(grads, name)[key]
            err = np.max(np.abs(g - fd)) / max(np.max(np.abs(fd)), 1e-12)
            assert err < rtol, (name, key, err)


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_global_gradients_fd(backend, kind, rng):
    d_s = 4 if kind == "dot" else 5
    h_t, h_s, params, mask = _inputs(rng, kind, t=3, s=4, d_s=d_s)
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask)
    _skip_unsupported(backend, op, args, kwargs)
    _loss_fd_check(op, args, kwargs, rng)


@pytest.mark.parametrize(("kind", "local"), LOCAL_CASES)
def test_local_gradients_fd(backend, kind, local, rng):
    h_t, h_s, params, mask = _inputs(rng, kind, t=4, s=7)
    if local.get("mode") == "predictive":
        params = dict(params or {}, w_p=rng.standard_normal((3, 4)), v_p=rng.standard_normal(3))
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask, local)
    _skip_unsupported(backend, op, args, kwargs)
    _loss_fd_check(op, args, kwargs, rng)


def test_local_p_gradient_through_p_t(rng):
    """With dot scores and no mask, w_p and v_p influence the loss only through p_t."""
    h_t, h_s = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 12, 4))
    params = {"w_p": rng.standard_normal((2, 4)), "v_p": rng.standard_normal(2)}
    op = aa.local_attention
    kwargs = {"window": 3, "mode": "predictive"}
    (c, a), res = op.fwd(h_t, h_s, params, **kwargs)
    g = op.bwd(res, (np.ones_like(c), None))
    assert np.abs(g.params["v_p"]).max() > 1e-3  # a real, non-vanishing gradient
    errs = directional_errors(op, (h_t, h_s, params), kwargs, rng=rng)
    assert max(errs.values()) < 1e-6, errs


def test_weights_only_and_context_only_cotangents(rng):
    h_t, h_s, params, mask = _inputs(rng, "concat")
    (c, a), res = aa.luong_attention.fwd(h_t, h_s, params, score="concat", mask=mask)
    g_a = aa.luong_attention.bwd(res, (None, np.ones_like(a)))
    g_c = aa.luong_attention.bwd(res, (np.ones_like(c), None))
    g_both = aa.luong_attention.bwd(res, (np.ones_like(c), np.ones_like(a)))
    np.testing.assert_allclose(g_both.h_s, g_a.h_s + g_c.h_s, rtol=1e-12, atol=1e-14)
    # Σ_s a = 1 in every row, so a weights-only cotangent of ones has zero gradient.
    np.testing.assert_allclose(g_a.h_t, 0, atol=1e-14)


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_reference_backward_on_namespaces(xp, kind, rng):
    h_t, h_s, params, mask = _inputs(rng, kind, d_s=4)
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask)
    (c, a), res = op.fwd(*args, **kwargs)
    cts = (rng.standard_normal(c.shape), rng.standard_normal(a.shape))
    want = op.bwd(res, cts)
    with aa.use_backend("array_api"):
        xargs = tuple(to_xp(xp, x) for x in args)
        xkw = {k: to_xp(xp, v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        (cx, ax), resx = op.fwd(*xargs, **xkw)
        got = op.bwd(resx, tuple(to_xp(xp, ct) for ct in cts))
    for name in op.differentiable:
        w, g = getattr(want, name), to_numpy(getattr(got, name))
        if isinstance(w, dict):
            assert sorted(w) == sorted(g)
            for key in w:
                assert_close_rel(g[key], w[key], 1e-12, f"{name}[{key}]")
        elif w is None:
            assert g is None
        else:
            assert_close_rel(g, w, 1e-12, name)


# -- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_fully_masked_source_gives_zeros(backend, kind, rng):
    h_t, h_s, params, _ = _inputs(rng, kind, d_s=4)
    mask = np.ones((2, 1, 5), bool)
    mask[1] = False
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask)
    _skip_unsupported(backend, op, args, kwargs)
    (c, a), res = op.fwd(*args, **kwargs)
    assert np.all(c[1] == 0)
    assert np.all(a[1] == 0)
    g = op.bwd(res, (np.ones_like(c), np.ones_like(a)))
    for name in op.differentiable:
        x = getattr(g, name)
        for arr in x.values() if isinstance(x, dict) else [] if x is None else [x]:
            assert np.all(np.isfinite(arr))
    assert np.all(getattr(g, op.differentiable[0])[1] == 0)


def test_local_window_outside_sentence_gives_zeros(backend, rng):
    h_t, h_s = rng.standard_normal((4, 3)), rng.standard_normal((3, 3))
    (c, a), res = aa.local_attention.fwd(h_t, h_s, window=0, offset=1)  # p_t = 1..4
    assert np.all(a[2:] == 0)
    assert np.all(c[2:] == 0)
    g = aa.local_attention.bwd(res, (np.ones_like(c), np.ones_like(a)))
    assert np.all(np.isfinite(g.h_t))
    assert np.all(g.h_t[2:] == 0)


@pytest.mark.parametrize("kind", ["dot", "general", "concat"])
def test_huge_logits_no_overflow(backend, kind, rng):
    h_t, h_s, params, mask = _inputs(rng, kind, d_s=4)
    h_t, h_s = h_t * 1e3, h_s * 1e3
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask)
    _skip_unsupported(backend, op, args, kwargs)
    c, a = op(*args, **kwargs)
    assert np.all(np.isfinite(c))
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-12)


def test_size_one_axes(rng):
    h_t, h_s = rng.standard_normal((1, 1, 1)), rng.standard_normal((1, 1, 1))
    c, a = aa.luong_attention(h_t, h_s)
    np.testing.assert_array_equal(a, np.ones((1, 1, 1)))
    np.testing.assert_allclose(c, h_s)
    c, a = aa.local_attention(h_t[0], h_s[0], window=0)
    np.testing.assert_array_equal(a, [[1.0]])


def test_no_batch_dims_and_empty_targets(rng):
    h_t, h_s, params, _ = _inputs(rng, "concat", lead=(), masked=False)
    c, a = aa.luong_attention(h_t, h_s, params, score="concat")
    c_ref, a_ref = oracle(h_t, h_s, params, kind="concat")
    np.testing.assert_allclose(c, c_ref, rtol=1e-12)
    (c, a), res = aa.luong_attention.fwd(h_t[:0], h_s, params, score="concat")
    assert c.shape == (0, 4)
    assert a.shape == (0, 5)
    g = aa.luong_attention.bwd(res, (c, a))
    assert g.h_t.shape == (0, 4)
    assert np.all(g.params["w_a"] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_dtypes(dtype, rng):
    h_t, h_s, params, mask = _inputs(rng, "concat")

    def cast(x):
        return None if x is None else x.astype(dtype)

    p = {k: cast(v) for k, v in params.items()}
    (c, a), res = aa.luong_attention.fwd(cast(h_t), cast(h_s), p, score="concat", mask=mask)
    assert c.dtype == dtype
    assert a.dtype == dtype
    c_ref, a_ref = oracle(cast(h_t), cast(h_s), p, kind="concat", mask=mask)
    tol = 2e-6 if dtype == np.float32 else 2e-3
    assert_close_rel(c, c_ref, tol, "context")
    g = aa.luong_attention.bwd(res, (np.ones_like(c), np.ones_like(a)))
    assert g.h_t.dtype == dtype
    assert g.params["w_a"].dtype == dtype


def test_nan_propagates(rng):
    h_t, h_s, _, _ = _inputs(rng, "dot", masked=False)
    h_s[0, 2, 0] = np.nan
    c, a = aa.luong_attention(h_t, h_s)
    assert np.isnan(a[0]).all()
    assert np.isfinite(a[1]).all()


def test_read_only_inputs_unchanged(backend, rng):
    h_t, h_s, params, mask = _inputs(rng, "concat")
    params = dict(params, w_p=rng.standard_normal((2, 4)), v_p=rng.standard_normal(2))
    arrays = [h_t, h_s, mask, *params.values()]
    copies = [x.copy() for x in arrays]
    for x in arrays:
        x.flags.writeable = False
    (c, a), res = aa.local_attention.fwd(
        h_t, h_s, params, window=2, mode="predictive", score="concat", mask=mask
    )
    g = aa.local_attention.bwd(res, (np.ones_like(c), np.ones_like(a)))
    for x, y in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.shares_memory(g.h_t, h_t)


# -- independent PyTorch re-implementation (OpenNMT-py GlobalAttention semantics) ------------------


@pytest.mark.parametrize("kind", ["dot", "general", "mlp"])
def test_matches_opennmt_style_torch(kind, rng):
    torch = pytest.importorskip("torch")
    n, t, s, d = 2, 3, 6, 5
    h_t, h_s = rng.standard_normal((n, t, d)), rng.standard_normal((n, s, d))
    lengths = np.array([6, 4])
    keep = np.arange(s)[None, :] < lengths[:, None]
    tq, tc = torch.tensor(h_t, requires_grad=True), torch.tensor(h_s, requires_grad=True)
    if kind == "general":
        lin = torch.nn.Linear(d, d, bias=False, dtype=torch.float64)
        scores = torch.bmm(lin(tq), tc.transpose(1, 2))
        params, weights = {"w_a": lin.weight}, [lin.weight]
    elif kind == "mlp":
        lq = torch.nn.Linear(d, d, bias=True, dtype=torch.float64)
        lc = torch.nn.Linear(d, d, bias=False, dtype=torch.float64)
        v = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)
        wq = lq(tq).unsqueeze(2).expand(n, t, s, d)
        uh = lc(tc).unsqueeze(1).expand(n, t, s, d)
        scores = v(torch.tanh(wq + uh)).squeeze(-1)
        params = {"w_a": lq.weight, "b_a": lq.bias, "u_a": lc.weight, "v_a": v.weight[0]}
        weights = [lq.weight, lq.bias, lc.weight, v.weight]
    else:
        scores = torch.bmm(tq, tc.transpose(1, 2))
        params, weights = None, []
    scores = scores.masked_fill(~torch.tensor(keep)[:, None, :], -float("inf"))
    align = torch.softmax(scores, -1)
    ctx = torch.bmm(align, tc)
    dc, da = rng.standard_normal((n, t, d)), rng.standard_normal((n, t, s))
    loss = (ctx * torch.tensor(dc)).sum() + (align * torch.tensor(da)).sum()
    tgrads = torch.autograd.grad(loss, [tq, tc, *weights])
    np_params = None if params is None else {k: x.detach().numpy() for k, x in params.items()}
    op = aa.bahdanau_attention if kind == "mlp" else aa.luong_attention
    kwargs = {"mask": keep[:, None, :]} | ({} if kind == "mlp" else {"score": kind})
    (c, a), res = op.fwd(h_t, h_s, np_params, **kwargs)
    np.testing.assert_allclose(c, ctx.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(a, align.detach().numpy(), rtol=1e-12, atol=1e-13)
    g = op.bwd(res, (dc, da))
    ours = [g[0], g[1]] + ([] if params is None else [g.params[k] for k in params])
    for x, y in zip(ours, tgrads, strict=True):
        np.testing.assert_allclose(x, y.numpy().reshape(x.shape), rtol=1e-10, atol=1e-12)


# -- property test -----------------------------------------------------------------------------


@given(
    t=st.integers(1, 4),
    s=st.integers(1, 6),
    d=st.integers(1, 4),
    radius=st.integers(0, 3),
    offset=st.integers(-2, 3),
    seed=st.integers(0, 2**16),
)
def test_local_m_property(t, s, d, radius, offset, seed):
    rng = np.random.default_rng(seed)
    h_t, h_s = rng.standard_normal((t, d)), rng.standard_normal((s, d))
    c, a = aa.local_attention(h_t, h_s, window=radius, offset=offset)
    c_ref, a_ref = oracle(h_t, h_s, local={"window": radius, "offset": offset})
    np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-14)


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs(rng):
    h_t, h_s = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    f = aa.luong_attention
    with pytest.raises(ValueError, match="score"):
        f(h_t, h_s, score="bilinear")
    with pytest.raises(ValueError, match="h_s"):
        f(h_t, rng.standard_normal((3, 5, 4)))
    with pytest.raises(ValueError, match="h_s"):
        f(h_t, rng.standard_normal((2, 5, 3)))  # dot needs equal widths
    with pytest.raises(ValueError, match="h_t"):
        f(rng.standard_normal(4), h_s)
    with pytest.raises(TypeError, match="h_s"):
        f(h_t, h_s.astype(np.float32))
    with pytest.raises(TypeError, match="h_t"):
        f(h_t.astype(int), h_s)
    with pytest.raises(TypeError, match="h_s"):
        f(h_t, h_s.tolist())
    with pytest.raises(TypeError, match="mask"):
        f(h_t, h_s, mask=np.ones((2, 1, 5)))
    with pytest.raises(ValueError, match="mask"):
        f(h_t, h_s, mask=np.ones((2, 5), bool))  # needs (..., T, S): pass mask[:, None, :]
    with pytest.raises(ValueError, match="params"):
        f(h_t, h_s, {"w_a": np.eye(4)})  # dot takes no params
    with pytest.raises(ValueError, match="w_a"):
        f(h_t, h_s, score="general")
    with pytest.raises(ValueError, match="w_a"):
        f(h_t, h_s, {"w_a": np.eye(3)}, score="general")
    with pytest.raises(ValueError, match="v_a"):
        f(h_t, h_s, {"w_a": np.ones((3, 8))}, score="concat")
    with pytest.raises(ValueError, match="b_a"):
        f(h_t, h_s, {"w_a": np.ones((3, 8)), "v_a": np.ones(3), "b_a": np.ones(2)}, score="concat")
    with pytest.raises(ValueError, match="w_a"):
        f(h_t, h_s, {"w_a": np.ones((4, 4))}, score="location")  # S_max < S
    with pytest.raises(TypeError, match="w_a"):
        f(h_t, h_s, {"w_a": np.ones((4, 4), np.float32)}, score="general")
    with pytest.raises(TypeError, match="params"):
        f(h_t, h_s, [np.eye(4)], score="general")
    with pytest.raises(ValueError, match="h_s"):
        f(h_t, h_s[:, :0])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="namespaces"):
        f(h_t, torch.tensor(h_s))
    b = aa.bahdanau_attention
    p = {"w_a": np.ones((3, 4)), "u_a": np.ones((3, 4)), "v_a": np.ones(3)}
    with pytest.raises(ValueError, match="u_a"):
        b(h_t, h_s, {**p, "u_a": np.ones((3, 5))})
    with pytest.raises(ValueError, match="w_a"):
        b(h_t, h_s, {k: v for k, v in p.items() if k != "w_a"})
    with pytest.raises(ValueError, match="extra"):
        b(h_t, h_s, {**p, "extra": np.ones(3)})
    loc = aa.local_attention
    with pytest.raises(ValueError, match="window"):
        loc(h_t, h_s, window=-1)
    with pytest.raises(TypeError, match="window"):
        loc(h_t, h_s, window=1.5)
    with pytest.raises(ValueError, match="window"):
        loc(h_t, h_s, {"w_p": np.ones((2, 4)), "v_p": np.ones(2)}, window=0, mode="predictive")
    with pytest.raises(ValueError, match="w_p"):
        loc(h_t, h_s, window=2, mode="predictive")
    with pytest.raises(ValueError, match="v_p"):
        loc(h_t, h_s, {"w_p": np.ones((2, 4)), "v_p": np.ones(3)}, window=2, mode="predictive")
    for name, value in (
        ("mode", "fixed"),
        ("center", "ceil"),
        ("p_scale", "S+1"),
        ("index_base", 2),
        ("score", "location"),
    ):
        with pytest.raises(ValueError, match=name):
            loc(h_t, h_s, window=1, **{name: value})
    (c, a), res = f.fwd(h_t, h_s)
    with pytest.raises(TypeError, match="cotangents"):
        f.bwd(res, np.ones_like(c))
    with pytest.raises(ValueError, match="weights"):
        f.bwd(res, (None, np.ones((2, 3, 4))))


# -- numba kernels ---------------------------------------------------------------------------------


NUMBA_CASES = [
    ("luong", "concat", None),
    ("bahdanau", "additive", None),
    ("local", "dot", {"window": 1, "offset": 1}),
    ("local", "general", {"window": 2, "mode": "predictive"}),
    ("local", "concat", {"window": 2, "mode": "predictive", "center": "round", "p_scale": "S-1"}),
    ("local", "dot", {"window": 1, "mode": "predictive", "index_base": 1}),
]


@pytest.mark.parametrize(("family", "kind", "local"), NUMBA_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_equals_reference(family, kind, local, dtype, rng):
    h_t, h_s, params, mask = _inputs(rng, kind, t=6, s=9, d_s=4)
    if local and local.get("mode") == "predictive":
        params = dict(params or {}, w_p=rng.standard_normal((3, 4)), v_p=rng.standard_normal(3))
    mask[0, 0, :] = False  # a fully masked batch element

    def cast(x):
        return None if x is None else x.astype(dtype)

    h_t, h_s = cast(h_t), cast(h_s)
    params = None if params is None else {k: cast(v) for k, v in params.items()}
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask, local)
    require_kernel(op, "numba")
    cts = None
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            (c, a), res = op.fwd(*args, **kwargs)
            assert res.backend == name
            if cts is None:
                cts = (
                    rng.standard_normal(c.shape).astype(dtype),
                    rng.standard_normal(a.shape).astype(dtype),
                )
            results[name] = (c, a, op.bwd(res, cts))
    ref, got = results["array_api"], results["numba"]
    tol = RTOL[dtype]
    assert got[0].dtype == dtype
    assert got[1].dtype == dtype
    assert_close_rel(got[0], ref[0], tol, "context")
    assert_close_rel(got[1], ref[1], tol, "weights")
    for name in op.differentiable:
        w, g = getattr(ref[2], name), getattr(got[2], name)
        if isinstance(w, dict):
            for key in w:
                assert g[key].dtype == dtype
                assert_close_rel(g[key], w[key], 20 * tol, f"{name}[{key}]")
        elif w is not None:
            assert_close_rel(g, w, 20 * tol, name)


WIDE_CASES = [
    ("additive", None),
    ("concat", None),
    ("concat", {"window": 2, "mode": "predictive"}),
    ("general", {"window": 2, "mode": "predictive", "center": "round"}),
    ("dot", {"window": 1, "offset": 1}),
]


@pytest.mark.parametrize(("kind", "local"), WIDE_CASES)
@pytest.mark.parametrize(("parallel", "min_items"), [(False, 8), (True, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_kernel_paths_equal_reference(
    kind, local, parallel, min_items, dtype, rng, monkeypatch
):
    """The serial and parallel twins of the numba kernels (and the additive backward with per-chunk
    dkb buffers (3 chunks of 5 steps) and without), with d_a and d_s wide enough for the vectorized
    body of the
    inner loops plus a remainder, and some saturated tanh."""
    luong_kernels = pytest.importorskip("arrayattn.backends.numba.luong")
    monkeypatch.setattr(luong_kernels, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)
    monkeypatch.setattr(luong_kernels, "MIN_BWD_ITEMS", min_items)
    d_t, d_s = (37, 37) if kind == "dot" else (5, 37)
    h_t, h_s, _, mask = _inputs(rng, kind, lead=(3,), t=5, s=7, d_t=d_t, d_s=d_s)
    params = _params(rng, kind, d_t, d_s, d_a=37)
    params = {k: 3 * v for k, v in (params or {}).items()}
    if local and local.get("mode") == "predictive":
        params.update(w_p=rng.standard_normal((3, d_t)), v_p=rng.standard_normal(3))
    params = {k: v.astype(dtype) for k, v in params.items()} or None
    mask[1, 0, :] = False
    h_t, h_s = h_t.astype(dtype), h_s.astype(dtype)
    op, args, kwargs = _op_and_args(kind, h_t, h_s, params, mask, local)
    require_kernel(op, "numba")
    cts = (
        rng.standard_normal((3, 5, d_s)).astype(dtype),
        rng.standard_normal((3, 5, 7)).astype(dtype),
    )
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            (c, a), res = op.fwd(*args, **kwargs)
            assert res.backend == name
            results[name] = (c, a, op.bwd(res, cts))
    ref, got = results["array_api"], results["numba"]
    tol = RTOL[dtype]
    assert_close_rel(got[0], ref[0], tol, "context")
    assert_close_rel(got[1], ref[1], tol, "weights")
    assert not got[1][1].any()  # the fully masked batch element
    for name in op.differentiable:
        w, g = getattr(ref[2], name), getattr(got[2], name)
        if isinstance(w, dict):
            for key in w:
                assert_close_rel(g[key], w[key], 20 * tol, f"{name}[{key}]")
        elif w is not None:
            assert_close_rel(g, w, 20 * tol, name)

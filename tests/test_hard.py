"""hard_attention, gumbel_softmax, hard_concrete_gate.

Oracles are the spec formulas in NumPy float64 with the same uniforms; gumbel_softmax is also
compared with ``torch.nn.functional.gumbel_softmax`` itself, its exponential noise replaced by
``E = −log u`` from the same uniforms.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import RTOL, assert_close_rel, to_numpy, to_xp

HA, GS, HC = aa.hard_attention, aa.gumbel_softmax, aa.hard_concrete_gate


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# -- hard attention --------------------------------------------------------------------------------


def ha_oracle(a, e, u, mask=None):
    """Inverse-CDF sample per row: the first i with cdf_i > u (searchsorted 'right')."""
    lead = e.shape[:-1]
    mask = np.ones(e.shape, bool) if mask is None else np.broadcast_to(mask, e.shape)
    z = np.zeros(lead + (a.shape[-1],))
    s = np.zeros(e.shape)
    logp, ent = np.zeros(lead), np.zeros(lead)
    for idx in np.ndindex(*lead):
        if not mask[idx].any():
            continue
        x = np.where(mask[idx], e[idx], -np.inf)
        alpha = np.exp(x - x.max())
        alpha /= alpha.sum()
        i = int(np.searchsorted(np.cumsum(alpha), u[idx], side="right"))
        s[idx + (i,)] = 1
        z[idx] = a[idx + (i,)]
        logp[idx] = np.log(alpha[i])
        nz = alpha > 0
        ent[idx] = -np.sum(alpha[nz] * np.log(alpha[nz]))
    return z, s, logp, ent


def _hard_inputs(rng, lead=(3, 2), length=5, d=4):
    return (
        rng.standard_normal((*lead, length, d)),
        rng.standard_normal((*lead, length)),
        rng.random(lead),
    )


def test_hard_attention_oracle(xp, rng):
    a, e, u = _hard_inputs(rng)
    mask = rng.random(e.shape) > 0.3
    mask[0, 1] = False
    for m in (None, mask):
        outs = HA(*(to_xp(xp, x) for x in (a, e, u)), mask=to_xp(xp, m))
        for got, want, what in zip(
            outs, ha_oracle(a, e, u, m), ("glimpse", "sample", "log_prob", "entropy"), strict=True
        ):
            assert_close_rel(got, want, RTOL[np.float64], what)


def test_hard_attention_sampling_frequencies(rng):
    """On a grid of N uniforms each location is drawn N·α_i times, up to one."""
    n = 1000
    e = rng.standard_normal(7)
    a = rng.standard_normal((7, 2))
    u = (np.arange(n) + 0.5) / n
    _, s, _, _ = HA(np.broadcast_to(a, (n, 7, 2)), np.broadcast_to(e, (n, 7)), u)
    counts = s.sum(axis=0)
    assert np.all(np.abs(counts - n * softmax(e)) <= 1), counts
    # Extreme uniforms stay inside the support; masked locations are never drawn.
    mask = np.array([1, 0, 1, 1, 0, 1, 0], bool)
    _, s, logp, _ = HA(np.stack([a, a]), np.stack([e, e]), np.array([0.0, 1.0]), mask=mask)
    assert s[0].argmax() == 0
    assert s[1].argmax() == 5
    assert np.isfinite(logp).all()


def test_hard_attention_estimator(rng):
    """bwd with reinforce_cotangents equals the Show-Attend-Tell estimator, term by term."""
    a, e, u = _hard_inputs(rng, lead=(4,), length=6, d=3)
    (z, s, logp, ent), res = HA.fwd(a, e, u)
    w = rng.standard_normal(3)
    log_p_y = z @ w
    dz = np.broadcast_to(w, z.shape)
    b = aa.moving_average_baseline(0.3, log_p_y.mean())
    assert b == pytest.approx(0.9 * 0.3 + 0.1 * log_p_y.mean())
    lr, le = 0.7, 0.05
    g = HA.bwd(res, aa.reinforce_cotangents(dz, log_p_y, b, lambda_r=lr, lambda_e=le))
    alpha = softmax(e)

    def entropy(x):
        p = softmax(x)
        return -np.sum(p * np.log(p))

    for r in range(4):
        dent = numerical_gradient(entropy, e[r])
        want = lr * (log_p_y[r] - b) * (s[r] - alpha[r]) + le * dent
        np.testing.assert_allclose(g.e[r], want, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(g.a[r], s[r][:, None] * w[None, :], rtol=0, atol=0)


def test_hard_attention_reinforce_is_unbiased(rng):
    """Averaged over a grid of uniforms, ∇_e log p(s̃) f(s̃) equals ∇_e E_α[f] (score function)."""
    n, length = 4000, 5
    e = rng.standard_normal(length)
    f = rng.standard_normal(length)  # a reward per location
    a = np.broadcast_to(np.eye(length), (n, length, length))
    u = (np.arange(n) + 0.5) / n
    (z, s, _, _), res = HA.fwd(a, np.broadcast_to(e, (n, length)), u)
    reward = s @ f
    g = HA.bwd(res, (None, None, reward, None))
    estimate = g.e.mean(axis=0)
    exact = numerical_gradient(lambda x: float(softmax(x) @ f), e)
    np.testing.assert_allclose(estimate, exact, atol=5e-3)


def test_hard_attention_gradients(rng):
    for args, kwargs in HA.examples(rng):
        errs = directional_errors(HA, args, kwargs, rng=rng)
        assert max(errs.values()) < 1e-6, errs
    a, e, u = _hard_inputs(rng, lead=(2,), length=4, d=2)
    (z, s, lp, h), res = HA.fwd(a, e, u)
    cts = tuple(rng.standard_normal(x.shape) for x in (z, s, lp, h))
    g = HA.bwd(res, cts)

    def f(e_):
        o = HA(a, e_, u)
        return float(
            sum(np.sum(x * c) for x, c, keep in zip(o, cts, (1, 0, 1, 1), strict=True) if keep)
        )

    np.testing.assert_allclose(g.e, numerical_gradient(f, e), rtol=1e-6, atol=1e-9)


def test_hard_attention_fully_masked_and_huge(rng):
    a, e, u = _hard_inputs(rng, lead=(2,))
    mask = np.ones(e.shape, bool)
    mask[1] = False
    (z, s, lp, h), res = HA.fwd(a, e * 1e4, u, mask=mask)
    assert np.isfinite(np.concatenate([z.ravel(), s.ravel(), lp, h])).all()
    assert not z[1].any()
    assert not s[1].any()
    assert lp[1] == 0
    assert h[1] == 0
    g = HA.bwd(res, tuple(np.ones_like(x) for x in (z, s, lp, h)))
    assert np.isfinite(g.e).all()
    assert not g.e[1].any()
    assert not g.a[1].any()


def test_hard_attention_float32(rng):
    a, e, u = _hard_inputs(rng)
    outs = HA(a.astype(np.float32), e.astype(np.float32), u.astype(np.float32))
    assert all(o.dtype == np.float32 for o in outs)
    want = ha_oracle(a, e, u)
    assert_close_rel(outs[0], want[0], RTOL[np.float32])


def test_hard_attention_bad_inputs(rng):
    a, e, u = _hard_inputs(rng)
    with pytest.raises(ValueError, match="e: expected shape"):
        HA(a, e[..., :3], u)
    with pytest.raises(ValueError, match="uniforms: expected shape"):
        HA(a, e, u[:2])
    with pytest.raises(TypeError, match="mask"):
        HA(a, e, u, mask=np.ones(e.shape))
    with pytest.raises(TypeError, match="uniforms"):
        HA(a, e, np.ones(u.shape, int))


# -- Gumbel-softmax --------------------------------------------------------------------------------


def gumbel_oracle(logits, u, tau, axis=-1):
    return softmax((logits - np.log(-np.log(u))) / tau, axis=axis)


@pytest.mark.parametrize("tau", [1.0, 0.3, 5.0])
def test_gumbel_closed_form(xp, tau, rng):
    logits, u = rng.standard_normal((3, 2, 6)), rng.random((3, 2, 6))
    y = GS(to_xp(xp, logits), to_xp(xp, u), tau=tau)
    assert_close_rel(y, gumbel_oracle(logits, u, tau), RTOL[np.float64])
    y = GS(to_xp(xp, logits), to_xp(xp, u), tau=tau, axis=1)
    assert_close_rel(y, gumbel_oracle(logits, u, tau, axis=1), RTOL[np.float64])
    y = to_numpy(GS(to_xp(xp, logits), to_xp(xp, u), tau=tau, hard=True))
    want = gumbel_oracle(logits, u, tau)
    assert np.array_equal(y, (want == want.max(-1, keepdims=True)).astype(float))


def test_gumbel_straight_through_gradient_is_soft(rng):
    logits, u = rng.standard_normal((4, 5)), rng.random((4, 5))
    dy = rng.standard_normal((4, 5))
    _, soft = GS.fwd(logits, u, tau=0.7)
    _, hard = GS.fwd(logits, u, tau=0.7, hard=True)
    assert np.array_equal(GS.bwd(hard, dy).logits, GS.bwd(soft, dy).logits)

    def f(x):
        return float(np.sum(GS(x, u, tau=0.7) * dy))

    np.testing.assert_allclose(
        GS.bwd(soft, dy).logits, numerical_gradient(f, logits), rtol=1e-6, atol=1e-10
    )
    for args, kwargs in GS.examples(rng):
        assert max(directional_errors(GS, args, kwargs, rng=rng).values()) < 1e-6


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_matches_torch(hard, rng, monkeypatch):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    logits, u = rng.standard_normal((3, 7)), rng.random((3, 7))
    dy = rng.standard_normal((3, 7))
    noise = torch.from_numpy(-np.log(u))  # E ~ Exponential(1) from the same uniforms

    def exponential_(self, *args, **kwargs):
        with torch.no_grad():
            return self.copy_(noise)

    monkeypatch.setattr(torch.Tensor, "exponential_", exponential_)
    lt = torch.from_numpy(logits).requires_grad_()
    yt = F.gumbel_softmax(lt, tau=0.6, hard=hard)
    (gt,) = torch.autograd.grad(yt, lt, torch.from_numpy(dy))
    y, res = GS.fwd(logits, u, tau=0.6, hard=hard)
    assert_close_rel(y, yt.detach().numpy(), 1e-12)
    assert_close_rel(GS.bwd(res, dy).logits, gt.numpy(), 1e-12)


def test_gumbel_extremes(rng):
    logits = rng.standard_normal((2, 5))
    u = np.array([[0.0, 1.0, 0.5, 0.2, 0.9], [1.0, 1.0, 0.0, 0.0, 0.3]])
    for tau in (1.0, 1e-4):
        y, res = GS.fwd(logits * 1e3, u, tau=tau)
        g = GS.bwd(res, np.ones_like(y))
        assert np.isfinite(y).all()
        assert np.isfinite(g.logits).all()
        assert np.allclose(y.sum(-1), 1)
    y32 = GS(logits.astype(np.float32), u.astype(np.float32), tau=0.01)
    assert y32.dtype == np.float32
    assert np.isfinite(y32).all()
    eps = np.finfo(np.float64).eps
    assert_close_rel(GS(logits, u), gumbel_oracle(logits, np.clip(u, eps, 1 - eps), 1.0), 1e-12)


def test_gumbel_bad_inputs(rng):
    logits, u = rng.standard_normal((2, 5)), rng.random((2, 5))
    with pytest.raises(ValueError, match="uniforms"):
        GS(logits, u[:, :4])
    with pytest.raises(ValueError, match="tau"):
        GS(logits, u, tau=0.0)
    with pytest.raises(ValueError, match="axis"):
        GS(logits, u, axis=2)
    with pytest.raises(TypeError, match="logits"):
        GS(logits.astype(int), u)
    with pytest.raises(TypeError, match="hard"):
        GS(logits, u, hard=1)


# -- hard-concrete gates ---------------------------------------------------------------------------


def hc_oracle(log_alpha, u, beta=2 / 3, gamma=-0.1, zeta=1.1, eps=1e-6, training=True):
    if training:
        u = np.clip(u, eps, 1 - eps)
        s = sigmoid((np.log(u) - np.log(1 - u) + log_alpha) / beta)
    else:
        s = sigmoid(log_alpha)
    g = np.minimum(1, np.maximum(0, s * (zeta - gamma) + gamma))
    return g, np.sum(sigmoid(log_alpha - beta * np.log(-gamma / zeta)))


@pytest.mark.parametrize(
    "opts", [{}, {"beta": 0.33}, {"training": False}, {"gamma": -0.3, "zeta": 1.2}]
)
def test_hard_concrete_oracle(xp, opts, rng):
    log_alpha, u = rng.standard_normal(8) * 2, rng.random((3, 8))
    g, l0 = HC(to_xp(xp, log_alpha), to_xp(xp, u), **opts)
    want_g, want_l0 = hc_oracle(log_alpha, u, **opts)
    assert_close_rel(g, want_g, RTOL[np.float64])
    assert_close_rel(l0, np.asarray(want_l0), RTOL[np.float64])


def test_hard_concrete_limits(rng):
    # Voita et al.'s eval gate clip(σ(log α)·1.2 − 0.1, 0, 1) and its limits.
    la = np.array([-50.0, -3.0, 0.0, 2.0, 50.0])
    g, _ = HC(la, training=False)
    np.testing.assert_allclose(g, np.clip(sigmoid(la) * 1.2 - 0.1, 0, 1), rtol=1e-14)
    assert g[0] == 0
    assert g[-1] == 1
    # Sampled: log α → ±∞ closes / opens every gate; the penalty counts the open ones.
    u = rng.random((50, 5))
    g, l0 = HC(la, u)
    assert not g[:, 0].any()
    assert (g[:, -1] == 1).all()
    assert ((g >= 0) & (g <= 1)).all()
    assert l0 == pytest.approx(np.sum(sigmoid(la - (2 / 3) * np.log(0.1 / 1.1))))
    # The L0 term is P(g > 0) exactly: on a grid of N uniforms the open fraction is within 1/N.
    n = 2000
    grid = ((np.arange(n) + 0.5) / n)[:, None]
    la = rng.standard_normal(6)
    for beta in (2 / 3, 0.33):
        g, _ = HC(la, np.broadcast_to(grid, (n, 6)), beta=beta)
        p_open = sigmoid(la - beta * np.log(0.1 / 1.1))
        assert np.all(np.abs((g > 0).mean(axis=0) - p_open) <= 1.5 / n)
        assert np.all(
            np.abs((g == 1).mean(axis=0) - (1 - sigmoid(beta * np.log(1.1 / 0.1) - la))) <= 1.5 / n
        )


def test_hard_concrete_gradients(rng):
    la = rng.standard_normal(6)
    u = rng.random((4, 6))
    for opts in ({}, {"beta": 0.33}, {"training": False}):
        (g, l0), res = HC.fwd(la, u, **opts)
        dg, dl0 = rng.standard_normal(g.shape), np.asarray(0.37)
        got = HC.bwd(res, (dg, dl0)).log_alpha
        num = numerical_gradient(
            lambda x: float(np.sum(HC(x, u, **opts)[0] * dg) + HC(x, u, **opts)[1] * dl0), la
        )
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-9)
    (g, _), res = HC.fwd(la, u)
    dla = HC.bwd(res, (np.ones_like(g), None)).log_alpha
    clipped = (g == 0) | (g == 1)
    per_entry = HC.bwd(HC.fwd(la, u[:1])[1], (np.ones((1, 6)), None)).log_alpha
    assert np.all(per_entry[clipped[0]] == 0)
    assert np.isfinite(dla).all()
    for args, kwargs in HC.examples(rng):
        assert max(directional_errors(HC, args, kwargs, rng=rng).values()) < 1e-6


def test_hard_concrete_straight_through(rng):
    la, u = rng.standard_normal(6), rng.random((3, 6))
    (g, _), res = HC.fwd(la, u, hard=True)
    (gs, _), res_s = HC.fwd(la, u)
    assert np.array_equal(g, (gs > 0.5).astype(float))
    dg = rng.standard_normal(g.shape)
    assert np.array_equal(HC.bwd(res, (dg, None)).log_alpha, HC.bwd(res_s, (dg, None)).log_alpha)


def test_hard_concrete_bad_inputs(rng):
    la, u = rng.standard_normal(6), rng.random((3, 6))
    with pytest.raises(ValueError, match="uniforms: required"):
        HC(la)
    with pytest.raises(ValueError, match="uniforms: expected a shape"):
        HC(la, u[:, :4])
    with pytest.raises(ValueError, match="beta"):
        HC(la, u, beta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        HC(la, u, gamma=0.1)
    with pytest.raises(TypeError, match="log_alpha"):
        HC(la.astype(int), u)
    with pytest.raises(TypeError, match="training"):
        HC(la, u, training=0)


def test_read_only_inputs(rng):
    a, e, u = _hard_inputs(rng)
    la, uu = rng.standard_normal(6), rng.random((2, 6))
    for x in (a, e, u, la, uu):
        x.setflags(write=False)
    copies = [x.copy() for x in (a, e, u, la, uu)]
    outs, res = HA.fwd(a, e, u)
    HA.bwd(res, tuple(np.ones_like(o) for o in outs))
    y, res = GS.fwd(la, uu[0], hard=True)
    GS.bwd(res, np.ones_like(y))
    outs, res = HC.fwd(la, uu)
    HC.bwd(res, tuple(np.ones_like(o) for o in outs))
    for x, c in zip((a, e, u, la, uu), copies, strict=True):
        assert np.array_equal(x, c)

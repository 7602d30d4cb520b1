"""efficient_attention (Shen et al.) and linear_attention (Katharopoulos et al.) (derivation:
docs/derivations/linear_attention.rst).

Oracles: dense float64 NumPy from the spec formulas (the efficient-attention softmaxes written out
with explicit axes; linear attention as the masked (L × Lk) kernel matrix, and its causal form
also as the step-by-step prefix recurrence of the paper).
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from arrayattn._reference import linear_attention as ref_mod
from support import RTOL, assert_close_rel, to_xp

EA = aa.efficient_attention
LA = aa.linear_attention


def efficient_oracle(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    qs = np.exp(q - q.max(-1, keepdims=True))
    qs /= qs.sum(-1, keepdims=True)  # over the d features of each query
    ks = np.exp(k - k.max(-2, keepdims=True))
    ks /= ks.sum(-2, keepdims=True)  # over the positions of each key feature
    return qs @ (np.swapaxes(ks, -1, -2) @ v)


def phi(x):
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def linear_oracle(q, k, v, causal=False, eps=1e-6):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    a = phi(q) @ np.swapaxes(phi(k), -1, -2)
    if causal:
        a = np.tril(a)
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


def linear_prefix_loop(q, k, v, eps=1e-6):
    """The paper's RNN form: S_i = S_{i-1} + φ(k_i) v_iᵀ, z_i = z_{i-1} + φ(k_i)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.zeros(q.shape[:-2] + (q.shape[-1], v.shape[-1]))
    z = np.zeros(q.shape[:-2] + (q.shape[-1],))
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for i in range(q.shape[-2]):
        fk, fq = phi(k[..., i, :]), phi(q[..., i, :])
        s = s + fk[..., :, None] * v[..., i, None, :]
        z = z + fk
        out[..., i, :] = (
            np.einsum("...d,...dm->...m", fq, s) / (np.sum(fq * z, -1) + eps)[..., None]
        )
    return out


def _qkv(rng, lq, lk, d, dv, lead=(2,), dtype=np.float64):
    return (
        rng.standard_normal((*lead, lq, d)).astype(dtype),
        rng.standard_normal((*lead, lk, d)).astype(dtype),
        rng.standard_normal((*lead, lk, dv)).astype(dtype),
    )


def _fd_all(op, args, kwargs, rng):
    """Elementwise central differences for every input (tiny shapes)."""
    out, res = op.fwd(*args, **kwargs)
    do = rng.standard_normal(out.shape)
    g = op.bwd(res, do)
    for i, name in enumerate(("q", "k", "v")):

        def f(x, i=i):
            a = list(args)
            a[i] = x
            return float(np.sum(op(*a, **kwargs) * do))

        np.testing.assert_allclose(
            getattr(g, name), numerical_gradient(f, args[i]), rtol=1e-6, atol=1e-8, err_msg=name
        )


# -- efficient attention --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lq", "lk", "d", "dv"), [(5, 7, 3, 4), (7, 3, 6, 2), (1, 1, 1, 1), (4, 9, 1, 3)]
)
def test_efficient_oracle(xp, lq, lk, d, dv, rng):
    q, k, v = _qkv(rng, lq, lk, d, dv)
    out = EA(*(to_xp(xp, a) for a in (q, k, v)))
    assert_close_rel(out, efficient_oracle(q, k, v), RTOL[np.float64])


def test_efficient_gradients(rng):
    q, k, v = _qkv(rng, 4, 5, 3, 2, lead=())
    _fd_all(EA, (q, k, v), {}, rng)
    q, k, v = _qkv(rng, 6, 8, 3, 4, lead=(2, 2))
    assert max(directional_errors(EA, (q, k, v), {}, rng=rng).values()) < 1e-6


def test_efficient_rows_are_convex_combinations(rng):
    q, k, v = _qkv(rng, 6, 6, 4, 3)
    out = EA(q, k, v * 0 + 1.0)
    np.testing.assert_allclose(out, 1.0, rtol=1e-12)


def test_efficient_huge_logits_and_float32(rng):
    q, k, v = _qkv(rng, 5, 7, 3, 2)
    out = EA(q * 500, k * 500, v)
    assert np.isfinite(out).all()
    assert_close_rel(out, efficient_oracle(q * 500, k * 500, v), 1e-10)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out, res = EA.fwd(q32, k32, v32)
    g = EA.bwd(res, np.ones_like(out))
    assert out.dtype == np.float32
    assert all(a.dtype == np.float32 for a in g)
    assert_close_rel(out, efficient_oracle(q, k, v), RTOL[np.float32])


# -- linear attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 5, 300])  # 300 crosses the reference's chunk boundaries
def test_linear_oracle(xp, causal, length, rng):
    q, k, v = _qkv(rng, length, length, 3, 4)
    out = LA(*(to_xp(xp, a) for a in (q, k, v)), causal=causal)
    assert_close_rel(out, linear_oracle(q, k, v, causal), RTOL[np.float64])


def test_linear_noncausal_lengths_differ(rng):
    q, k, v = _qkv(rng, 4, 9, 3, 2)
    assert_close_rel(LA(q, k, v, eps=0.3), linear_oracle(q, k, v, eps=0.3), RTOL[np.float64])


def test_linear_causal_vs_prefix_loop(rng):
    q, k, v = _qkv(rng, 37, 37, 4, 3, lead=(2, 2))
    assert_close_rel(
        LA(q, k, v, causal=True, eps=1e-3), linear_prefix_loop(q, k, v, 1e-3), RTOL[np.float64]
    )


@pytest.mark.parametrize("causal", [False, True])
def test_linear_gradients(causal, rng):
    q, k, v = _qkv(rng, 5, 5, 2, 3, lead=())
    _fd_all(LA, (q, k, v), {"causal": causal}, rng)


def test_linear_causal_gradients_across_chunks(rng, monkeypatch):
    # small chunks so the forward prefix pass and the reverse suffix pass both carry state
    q, k, v = _qkv(rng, 11, 11, 3, 2)
    out1, res1 = LA.fwd(q, k, v, causal=True)
    g1 = LA.bwd(res1, np.cos(out1))
    monkeypatch.setattr(ref_mod, "CHUNK", 3)
    assert_close_rel(LA(q, k, v, causal=True), out1, 1e-13)
    errors = directional_errors(LA, (q, k, v), {"causal": True}, rng=rng)
    assert max(errors.values()) < 1e-6, errors
    out2, res2 = LA.fwd(q, k, v, causal=True)
    g2 = LA.bwd(res2, np.cos(out2))
    for a, b in zip(g1, g2, strict=True):
        assert_close_rel(b, a, 1e-12)


def test_linear_reference_namespaces_grads(xp, rng):
    q, k, v = _qkv(rng, 6, 6, 3, 2)
    do = rng.standard_normal((2, 6, 2))
    for causal in (False, True):
        out0, res0 = LA.fwd(q, k, v, causal=causal)
        g0 = LA.bwd(res0, do)
        with aa.use_backend("array_api"):
            out, res = LA.fwd(*(to_xp(xp, a) for a in (q, k, v)), causal=causal)
            g = LA.bwd(res, to_xp(xp, do))
        for a, b in zip((out, *g), (out0, *g0), strict=True):
            assert_close_rel(a, b, 1e-12)


def test_linear_float32(rng):
    q, k, v = _qkv(rng, 200, 200, 8, 4, dtype=np.float32)
    out = LA(q, k, v, causal=True)
    assert out.dtype == np.float32
    assert_close_rel(out, linear_oracle(q, k, v, True), RTOL[np.float32])


def test_read_only_inputs(rng):
    q, k, v = _qkv(rng, 5, 5, 2, 3)
    for a in (q, k, v):
        a.flags.writeable = False
    for op, kw in ((EA, {}), (LA, {"causal": True})):
        out, res = op.fwd(q, k, v, **kw)
        op.bwd(res, np.ones_like(out))


def test_bad_inputs(rng):
    q, k, v = _qkv(rng, 4, 6, 3, 2)
    for op in (EA, LA):
        with pytest.raises(ValueError, match="k"):
            op(q, k[..., :2], v)
        with pytest.raises(ValueError, match="v"):
            op(q, k, v[:, :5])
        with pytest.raises(TypeError, match="v"):
            op(q, k, v.astype(np.float32))
        with pytest.raises(ValueError, match="q"):
            op(q[0, 0], k, v)
    with pytest.raises(ValueError, match="k"):
        LA(q, k, v, causal=True)  # Lk != L
    with pytest.raises(ValueError, match="eps"):
        LA(q, k, v, eps=-1.0)
    with pytest.raises(TypeError, match="causal"):
        LA(q, k, v, causal=1)

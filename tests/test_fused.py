"""fused_attention (derivation: docs/derivations/fused.rst).

Oracle: the spec's column convention written out literally (K (d×L), Q (d×M), S = KᵀQ/√d, column
softmax, row mean / row max + renormalise, Y = g(Vα)); plus the identity "mean fuse = mean of the
M rows of scaled_dot_product_attention".
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import RTOL, assert_close_rel, to_numpy, to_xp

FA = aa.fused_attention


def oracle(q, k, v, *, fuse="mean", mask=None, scale=None, params=None):
    """Per batch element, in the spec's column-vector convention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    lead = q.shape[:-2]
    m, length, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    mask = (
        np.ones(lead + (m, length), bool)
        if mask is None
        else np.broadcast_to(mask, lead + (m, length))
    )
    ys, alphas = [], []
    for idx in np.ndindex(*lead):
        K, Q, V = k[idx].T, q[idx].T, v[idx].T  # (d, L), (d, M), (dv, L)
        S = K.T @ Q * scale  # (L, M)
        S = np.where(mask[idx].T, S, -np.inf)
        A = np.zeros_like(S)
        for col in range(m):  # column-wise softmax over the L inputs
            s = S[:, col]
            if np.isfinite(s).any():
                e = np.exp(s - s[np.isfinite(s)].max())
                A[:, col] = e / e.sum()
        if fuse == "mean":
            alpha = A.mean(axis=1)
        else:
            top = A.max(axis=1)
            alpha = top / top.sum() if top.sum() > 0 else top
        y = V @ alpha
        if params is not None:
            y = params["w_o"] @ y + params.get("b_o", 0)
        ys.append(y)
        alphas.append(alpha)
    return np.array(ys).reshape(lead + ys[0].shape), np.array(alphas).reshape(lead + (length,))


def _qkv(rng, m, length, d, dv, lead=(2,)):
    return (
        rng.standard_normal((*lead, m, d)),
        rng.standard_normal((*lead, length, d)),
        rng.standard_normal((*lead, length, dv)),
    )


@pytest.mark.parametrize("fuse", ["mean", "max"])
@pytest.mark.parametrize(
    ("m", "length", "d", "dv"), [(3, 7, 4, 5), (1, 1, 1, 1), (5, 2, 3, 6), (4, 9, 2, 1)]
)
def test_oracle(xp, fuse, m, length, d, dv, rng):
    q, k, v = _qkv(rng, m, length, d, dv)
    out, alpha = FA(*(to_xp(xp, a) for a in (q, k, v)), fuse=fuse, return_weights=True)
    y, a = oracle(q, k, v, fuse=fuse)
    assert_close_rel(out, y, RTOL[np.float64])
    assert_close_rel(alpha, a, RTOL[np.float64])


def test_mean_equals_mean_of_cross_attentions(rng):
    q, k, v = _qkv(rng, 6, 11, 4, 3, lead=(2, 3))
    mask = rng.random((2, 3, 6, 11)) > 0.4
    mask[0, 1, 2] = False
    for kw in ({}, {"mask": mask}, {"scale": 0.3}):
        rows = aa.scaled_dot_product_attention(q, k, v, **kw)
        assert_close_rel(FA(q, k, v, **kw), rows.mean(axis=-2), 1e-12)


def test_options_oracle(rng):
    q, k, v = _qkv(rng, 4, 6, 3, 5)
    mask = rng.random((4, 6)) > 0.3
    mask[2] = False  # a fully masked query
    params = {"w_o": rng.standard_normal((2, 5)), "b_o": rng.standard_normal(2)}
    for fuse in ("mean", "max"):
        out = FA(q, k, v, fuse=fuse, mask=mask, scale=0.8, params=params)
        assert_close_rel(
            out, oracle(q, k, v, fuse=fuse, mask=mask, scale=0.8, params=params)[0], 1e-12
        )
    out = FA(q, k, v, params={"w_o": params["w_o"]})
    assert_close_rel(out, oracle(q, k, v, params={"w_o": params["w_o"]})[0], 1e-12)


def test_fully_masked_everything_is_zero_not_nan(rng):
    q, k, v = _qkv(rng, 3, 4, 2, 2)
    mask = np.zeros((3, 4), bool)
    for fuse in ("mean", "max"):
        out, res = FA.fwd(q, k, v, mask=mask, fuse=fuse)
        assert np.array_equal(out, np.zeros_like(out))
        g = FA.bwd(res, np.ones_like(out))
        for a in (g.q, g.k, g.v):
            assert np.array_equal(a, np.zeros_like(a))


@pytest.mark.parametrize("fuse", ["mean", "max"])
def test_gradients_elementwise(fuse, rng):
    q, k, v = _qkv(rng, 3, 5, 2, 3, lead=())
    mask = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], bool)
    params = {"w_o": rng.standard_normal((2, 3)), "b_o": rng.standard_normal(2)}
    kw = {"fuse": fuse, "mask": mask, "params": params, "return_weights": True}
    (out, alpha), res = FA.fwd(q, k, v, **kw)
    dy, da = rng.standard_normal(out.shape), rng.standard_normal(alpha.shape)
    g = FA.bwd(res, (dy, da))

    def loss(q=q, k=k, v=v, params=params):
        o, a = FA(q, k, v, **{**kw, "params": params})
        return float(np.sum(o * dy) + np.sum(a * da))

    for name, x in (("q", q), ("k", k), ("v", v)):
        num = numerical_gradient(lambda x_, n=name: loss(**{n: x_}), x)
        np.testing.assert_allclose(getattr(g, name), num, rtol=1e-6, atol=1e-9, err_msg=name)
    for key in params:
        num = numerical_gradient(lambda x_, key=key: loss(params={**params, key: x_}), params[key])
        np.testing.assert_allclose(g.params[key], num, rtol=1e-6, atol=1e-9, err_msg=key)


def test_gradients_directional(rng):
    for args, kwargs in FA.examples(rng):
        errs = directional_errors(FA, args, kwargs, rng=rng)
        assert max(errs.values()) < 1e-6, (kwargs.keys(), errs)


def test_reference_namespaces_grads(xp, rng):
    q, k, v = _qkv(rng, 3, 6, 4, 2)
    dy = rng.standard_normal((2, 2))
    for fuse in ("mean", "max"):
        out, res = FA.fwd(*(to_xp(xp, a) for a in (q, k, v)), fuse=fuse)
        g = FA.bwd(res, to_xp(xp, dy))
        out0, res0 = FA.fwd(q, k, v, fuse=fuse)
        g0 = FA.bwd(res0, dy)
        assert_close_rel(out, out0, 1e-12)
        for a, b in zip(g[:3], g0[:3], strict=True):
            assert_close_rel(a, b, 1e-12)


def test_huge_logits_and_float32(rng):
    q, k, v = _qkv(rng, 3, 5, 4, 2)
    out = FA(q * 300, k * 300, v, fuse="max")
    assert np.isfinite(out).all()
    assert_close_rel(out, oracle(q * 300, k * 300, v, fuse="max")[0], 1e-10)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out, res = FA.fwd(q32, k32, v32)
    g = FA.bwd(res, np.ones_like(out))
    assert out.dtype == np.float32
    assert all(a.dtype == np.float32 for a in g[:3])
    assert_close_rel(out, oracle(q, k, v)[0], RTOL[np.float32])


def test_read_only_inputs(rng):
    q, k, v = _qkv(rng, 3, 5, 4, 2)
    params = {"w_o": rng.standard_normal((2, 2))}
    for a in (q, k, v, params["w_o"]):
        a.setflags(write=False)
    copies = [a.copy() for a in (q, k, v)]
    out, res = FA.fwd(q, k, v, params=params, fuse="max")
    FA.bwd(res, np.ones_like(out))
    for a, c in zip((q, k, v), copies, strict=True):
        assert np.array_equal(a, c)


def test_bad_inputs(rng):
    q, k, v = _qkv(rng, 3, 5, 4, 2)
    with pytest.raises(ValueError, match="k: expected last dimension"):
        FA(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v: expected L"):
        FA(q, k, v[:, :4])
    with pytest.raises(ValueError, match="fuse"):
        FA(q, k, v, fuse="sum")
    with pytest.raises(TypeError, match="mask"):
        FA(q, k, v, mask=np.ones((3, 5)))
    with pytest.raises(ValueError, match="mask"):
        FA(q, k, v, mask=np.ones((4, 5), bool))
    with pytest.raises(ValueError, match=r"params\['w_o'\]"):
        FA(q, k, v, params={"w_o": np.ones((2, 3))})
    with pytest.raises(ValueError, match="unknown keys"):
        FA(q, k, v, params={"w_o": np.ones((2, 2)), "w_x": np.ones(2)})
    with pytest.raises(TypeError, match="v: expected dtype"):
        FA(q, k, v.astype(np.float32))
    with pytest.raises(TypeError, match="q: expected a real floating"):
        FA(q.astype(int), k, v)
    with pytest.raises(ValueError, match="k: expected leading"):
        FA(q, k[:1], v[:1])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different namespaces"):
        FA(q, torch.from_numpy(k), v)
    assert to_numpy(FA(q, k, v)).shape == (2, 2)

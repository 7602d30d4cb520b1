"""Tests of the channel-attention blocks: SE, CBAM, SPANet and the attention condenser."""

from __future__ import annotations

import math

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from arrayattn._xp import namespace_name
from support import assert_close_rel, require_kernel, to_xp

OPS = [aa.squeeze_excitation, aa.cbam, aa.spatial_pyramid_attention, aa.attention_condenser]


# -- float64 oracles from the spec formulas (sections 10.1, 10.2, 11, 14.4) -----------------------


def sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def mlp(z, p):
    h = np.maximum(z @ p["w1"].T + p.get("b1", 0.0), 0.0)
    return h @ p["w2"].T + p.get("b2", 0.0)


def se_oracle(x, p):
    z = x.mean(axis=(2, 3))  # z_c = (1/HW) Σ u_c
    s = sig(mlp(z, p))
    return x * s[:, :, None, None]


def cbam_oracle(x, p, pool_order="avg_max"):
    mc = sig(mlp(x.mean(axis=(2, 3)), p) + mlp(x.max(axis=(2, 3)), p))
    f1 = mc[:, :, None, None] * x
    pools = [f1.mean(axis=1), f1.max(axis=1)]
    if pool_order == "max_avg":
        pools = pools[::-1]
    inp = np.stack(pools, axis=1)
    k = p["w_spatial"].shape[-1]
    pad = np.pad(inp, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h, w = x.shape[2:]
    logit = np.zeros((x.shape[0], h, w)) + p.get("b_spatial", np.zeros(1))[0]
    for i in range(k):
        for j in range(k):
            logit += np.einsum(
                "nchw,c->nhw", pad[:, :, i : i + h, j : j + w], p["w_spatial"][0, :, i, j]
            )
    return sig(logit)[:, None] * f1


def spa_oracle(x, p, levels=(1, 2, 4)):
    n, c, h, w = x.shape
    feats = []
    for ell in levels:
        pooled = np.empty((n, c, ell, ell))
        for i in range(ell):
            for j in range(ell):
                h0, h1 = math.floor(i * h / ell), math.ceil((i + 1) * h / ell)
                w0, w1 = math.floor(j * w / ell), math.ceil((j + 1) * w / ell)
                pooled[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
        feats.append(pooled.reshape(n, -1))
    s = sig(mlp(np.concatenate(feats, axis=1), p))
    return x * s[:, :, None, None]


def conv_loop(x, w, b=None, pad=0, groups=1):
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    y = np.zeros((n, o, ho, wo))
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(k):
            for j in range(k):
                y[:, oc] += np.einsum(
                    "nchw,c->nhw",
                    xp_[:, g * cg : (g + 1) * cg, i : i + ho, j : j + wo],
                    w[oc, :, i, j],
                )
        if b is not None:
            y[:, oc] += b[oc]
    return y


def condenser_oracle(x, p, pool_size, selective):
    n, c, h, w = x.shape
    s = pool_size
    ho, wo = h // s, w // s
    q = x[:, :, : ho * s, : wo * s].reshape(n, c, ho, s, wo, s).max(axis=(3, 5))  # C: max pooling
    k = p["w_embed"].shape[-1]
    e = np.maximum(
        conv_loop(q, p["w_embed"], p.get("b_embed"), k // 2, c // p["w_embed"].shape[1]), 0
    )
    e = np.maximum(conv_loop(e, p["w_point"], p.get("b_point")), 0)
    rows = np.minimum(np.floor(np.arange(h) * ho / h).astype(int), ho - 1)
    cols = np.minimum(np.floor(np.arange(w) * wo / w).astype(int), wo - 1)
    up = e[:, :, rows][:, :, :, cols]  # X: nearest upsampling back to (H, W), then the 1×1 expand
    a = conv_loop(up, p["w_expand"], p.get("b_expand"))
    scale = np.reshape(p["scale"], (1, -1, 1, 1)) if np.ndim(p["scale"]) else p["scale"]
    if selective == "additive":
        return scale * x + a
    if selective == "product":
        return x * sig(a) * scale
    return x + x * sig(a) * scale


# -- parameter factories --------------------------------------------------------------------------


def mlp_params(rng, c_in, hidden, c_out, bias=True):
    p = {
        "w1": rng.standard_normal((hidden, c_in)) / np.sqrt(c_in),
        "w2": rng.standard_normal((c_out, hidden)) / np.sqrt(hidden),
    }
    if bias:
        p["b1"], p["b2"] = 0.1 * rng.standard_normal(hidden), 0.1 * rng.standard_normal(c_out)
    return p


def cbam_params(rng, c, hidden, k=7, bias=True):
    p = mlp_params(rng, c, hidden, c, bias)
    p["w_spatial"] = rng.standard_normal((1, 2, k, k)) / k
    if bias:
        p["b_spatial"] = 0.1 * rng.standard_normal(1)
    return p


def condenser_params(rng, c=4, ce=6, ce2=3, groups=2, k=3, scale_shape=()):
    return {
        "w_embed": rng.standard_normal((ce, c // groups, k, k)) / k,
        "b_embed": 0.1 * rng.standard_normal(ce),
        "w_point": rng.standard_normal((ce2, ce, 1, 1)) / 2,
        "b_point": 0.1 * rng.standard_normal(ce2),
        "w_expand": rng.standard_normal((c, ce2, 1, 1)) / 2,
        "b_expand": 0.1 * rng.standard_normal(c),
        "scale": rng.standard_normal(scale_shape),
    }


# -- forward vs oracles ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_se_oracle(rng, bias):
    x = rng.standard_normal((3, 8, 5, 4))
    p = mlp_params(rng, 8, 2, 8, bias)
    assert_close_rel(aa.squeeze_excitation(x, p), se_oracle(x, p), 1e-13)


@pytest.mark.parametrize("pool_order", ["avg_max", "max_avg"])
@pytest.mark.parametrize(("k", "bias"), [(7, True), (3, False)])
def test_cbam_oracle(rng, pool_order, k, bias):
    x = rng.standard_normal((2, 6, 9, 8))
    p = cbam_params(rng, 6, 3, k, bias)
    assert_close_rel(aa.cbam(x, p, pool_order=pool_order), cbam_oracle(x, p, pool_order), 1e-13)


def test_cbam_pool_order_matters(rng):
    x = rng.standard_normal((2, 6, 9, 8))
    p = cbam_params(rng, 6, 3)
    assert np.max(np.abs(aa.cbam(x, p) - aa.cbam(x, p, pool_order="max_avg"))) > 1e-3
    # swapping the two input channels of the spatial weight turns one order into the other
    q = dict(p, w_spatial=p["w_spatial"][:, ::-1].copy())
    assert_close_rel(aa.cbam(x, q, pool_order="max_avg"), cbam_oracle(x, p), 1e-13)


@pytest.mark.parametrize(
    ("shape", "levels"),
    [((2, 3, 8, 8), (1, 2, 4)), ((2, 3, 7, 10), (1, 2, 4)), ((1, 2, 5, 5), (1, 3))],
)
def test_spa_oracle(rng, shape, levels):
    x = rng.standard_normal(shape)
    c = shape[1]
    p = mlp_params(rng, sum(ell * ell for ell in levels) * c, 5, c)
    assert_close_rel(
        aa.spatial_pyramid_attention(x, p, levels=levels), spa_oracle(x, p, levels), 1e-13
    )


@pytest.mark.parametrize("selective", ["additive", "product", "gated_residual"])
@pytest.mark.parametrize(
    ("shape", "pool", "scale_shape"), [((2, 4, 8, 6), 2, ()), ((1, 4, 7, 9), 3, (4,))]
)
def test_condenser_oracle(rng, selective, shape, pool, scale_shape):
    x = rng.standard_normal(shape)
    p = condenser_params(rng, scale_shape=scale_shape)
    y = aa.attention_condenser(x, p, pool_size=pool, selective=selective)
    assert_close_rel(y, condenser_oracle(x, p, pool, selective), 1e-13)


def test_condenser_limits_as_scale_vanishes(rng):
    x = rng.standard_normal((2, 4, 8, 6))
    p = condenser_params(rng)
    a = condenser_oracle(x, dict(p, scale=np.array(0.0)), 2, "additive")  # S = 0 leaves A alone
    assert np.max(np.abs(a)) > 1e-2
    assert np.max(np.abs(a - x)) > 1e-2
    for s in (1e-2, 1e-4, 1e-6):
        y = aa.attention_condenser(x, dict(p, scale=np.array(s)), pool_size=2, selective="additive")
        assert np.max(np.abs(y - a)) <= 1.0001 * s * np.max(np.abs(x))
    y = aa.attention_condenser(
        x, dict(p, scale=np.array(1e-9)), pool_size=2, selective="gated_residual"
    )
    np.testing.assert_allclose(y, x, atol=1e-8)  # gated_residual tends to V instead
    y = aa.attention_condenser(x, dict(p, scale=np.array(1e-9)), pool_size=2, selective="product")
    np.testing.assert_allclose(y, 0, atol=1e-8)  # and product to 0


# -- against PyTorch blocks with the same weights -------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def torch_se(x, p):
    t = _torch()
    F = t.nn.functional
    s = t.sigmoid(
        F.linear(F.relu(F.linear(x.mean((2, 3)), p["w1"], p.get("b1"))), p["w2"], p.get("b2"))
    )
    return x * s[:, :, None, None]


def torch_cbam_official(x, p):
    """Jongchan/attention-module's CBAM (ChannelPool = [max, mean]) without the BN."""
    t = _torch()
    F = t.nn.functional

    def fc(z):
        return F.linear(F.relu(F.linear(z, p["w1"], p.get("b1"))), p["w2"], p.get("b2"))

    n, c = x.shape[:2]
    avg = F.avg_pool2d(x, x.shape[2:]).view(n, c)
    mx = F.max_pool2d(x, x.shape[2:]).view(n, c)
    f1 = x * t.sigmoid(fc(avg) + fc(mx))[:, :, None, None]
    pooled = t.cat((t.max(f1, 1)[0].unsqueeze(1), t.mean(f1, 1).unsqueeze(1)), dim=1)
    k = p["w_spatial"].shape[-1]
    return f1 * t.sigmoid(F.conv2d(pooled, p["w_spatial"], p.get("b_spatial"), padding=k // 2))


@pytest.mark.parametrize("block", ["se", "cbam"])
def test_vs_torch_block(rng, block):
    t = _torch()
    x = rng.standard_normal((2, 16, 7, 6))
    p = mlp_params(rng, 16, 4, 16) if block == "se" else cbam_params(rng, 16, 4)
    op = aa.squeeze_excitation if block == "se" else aa.cbam
    kw = {} if block == "se" else {"pool_order": "max_avg"}
    y, res = op.fwd(x, p, **kw)
    dy = rng.standard_normal(y.shape)
    g = op.bwd(res, dy)
    xt = t.tensor(x, requires_grad=True)
    pt = {k: t.tensor(v, requires_grad=True) for k, v in p.items()}
    yt = (torch_se if block == "se" else torch_cbam_official)(xt, pt)
    yt.backward(t.tensor(dy))
    assert_close_rel(y, yt.detach().numpy(), 1e-13, "y")
    assert_close_rel(g.x, xt.grad.numpy(), 1e-12, "dx")
    assert sorted(g.params) == sorted(p)
    for k in p:
        assert_close_rel(g.params[k], pt[k].grad.numpy(), 1e-12, k)


# -- gradients: finite differences ----------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_directional_finite_differences(op):
    rng = np.random.default_rng(11)
    for args, kwargs in op.examples(rng):
        errors = directional_errors(op, args, kwargs, rng=rng)
        assert max(errors.values()) < 1e-6, (kwargs, errors)


@pytest.mark.parametrize(
    ("op", "make", "kwargs"),
    [
        (aa.squeeze_excitation, lambda r: mlp_params(r, 3, 2, 3), {}),
        (aa.cbam, lambda r: cbam_params(r, 3, 2, k=3), {"pool_order": "max_avg"}),
        (aa.spatial_pyramid_attention, lambda r: mlp_params(r, 5 * 3, 2, 3), {"levels": (1, 2)}),
        (
            aa.attention_condenser,
            lambda r: condenser_params(r, c=3, ce=3, ce2=2, groups=3, scale_shape=(3,)),
            {"pool_size": 2, "selective": "gated_residual"},
        ),
    ],
    ids=["se", "cbam", "spa", "condenser"],
)
def test_elementwise_numerical_gradient(rng, op, make, kwargs):
    x = rng.standard_normal((2, 3, 4, 5))
    p = make(rng)
    y, res = op.fwd(x, p, **kwargs)
    dy = rng.standard_normal(y.shape)
    g = op.bwd(res, dy)
    num = numerical_gradient(lambda a: float(np.sum(op(a, p, **kwargs) * dy)), x)
    np.testing.assert_allclose(g.x, num, rtol=1e-6, atol=1e-8)
    for key in p:
        num = numerical_gradient(
            lambda a: float(np.sum(op(x, {**p, key: a}, **kwargs) * dy)), p[key]
        )
        np.testing.assert_allclose(g.params[key], num, rtol=1e-6, atol=1e-8, err_msg=key)


# -- namespaces, dtypes, read-only ----------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_reference_on_namespaces(xp, op):
    if namespace_name(xp) == "jax" and op is not aa.squeeze_excitation:
        pytest.skip("jax: eager dispatch of every small op is slow; SE and the primitives cover it")
    rng = np.random.default_rng(5)
    for args, kwargs in op.examples(rng)[:2]:
        y_np, res_np = op.fwd(*args, **kwargs)
        dy = rng.standard_normal(y_np.shape)
        g_np = op.bwd(res_np, dy)
        y, res = op.fwd(to_xp(xp, args[0]), to_xp(xp, args[1]), **kwargs)
        assert_close_rel(y, y_np, 1e-12, "y")
        g = op.bwd(res, to_xp(xp, dy))
        assert_close_rel(g.x, g_np.x, 1e-12, "dx")
        for k, v in g_np.params.items():
            assert_close_rel(g.params[k], v, 1e-12, k)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_float32(op):
    rng = np.random.default_rng(2)
    args, kwargs = op.examples(rng)[0]
    x32 = args[0].astype(np.float32)
    p32 = {k: v.astype(np.float32) for k, v in args[1].items()}
    y, res = op.fwd(x32, p32, **kwargs)
    g = op.bwd(res, np.ones_like(y))
    assert y.dtype == np.float32
    assert g.x.dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.params.values())
    y64 = op(
        args[0].astype(np.float32).astype(np.float64),
        {k: v.astype(np.float64) for k, v in p32.items()},
        **kwargs,
    )
    assert_close_rel(y, y64, 1e-5)


def test_read_only_inputs(rng):
    x = rng.standard_normal((2, 6, 5, 4))
    p = cbam_params(rng, 6, 3)
    for a in (x, *p.values()):
        a.flags.writeable = False
    x0 = x.copy()
    for op in (aa.cbam, aa.squeeze_excitation):
        q = p if op is aa.cbam else {k: v for k, v in p.items() if "spatial" not in k}
        y, res = op.fwd(x, q)
        assert not np.shares_memory(y, x)
        g = op.bwd(res, np.ones_like(y))
        assert not np.shares_memory(g.x, x)
    np.testing.assert_array_equal(x, x0)


# -- bad inputs: errors name the offending key ----------------------------------------------------


@pytest.mark.parametrize(
    ("op", "mutate", "kwargs", "exc", "match"),
    [
        (aa.squeeze_excitation, lambda p: p.pop("w1"), {}, ValueError, "w1"),
        (aa.squeeze_excitation, lambda p: p.update(w2=p["w2"][:, :1]), {}, ValueError, "w2"),
        (aa.squeeze_excitation, lambda p: p.update(b2=p["b2"][:3]), {}, ValueError, "b2"),
        (aa.squeeze_excitation, lambda p: p.update(w1=p["w1"][:, :3]), {}, ValueError, "w1"),
        (aa.squeeze_excitation, lambda p: p.update(extra=p["b1"]), {}, ValueError, "extra"),
        (
            aa.squeeze_excitation,
            lambda p: p.update(b1=p["b1"].astype(np.float32)),
            {},
            TypeError,
            "b1",
        ),
        (
            aa.cbam,
            lambda p: p.update(w_spatial=p["w_spatial"][:, :, :6, :6]),
            {},
            ValueError,
            "w_spatial",
        ),
        (aa.cbam, lambda p: p.update(w_spatial=p["w_spatial"][:, :1]), {}, ValueError, "w_spatial"),
        (aa.cbam, lambda p: p.update(b_spatial=np.ones(2)), {}, ValueError, "b_spatial"),
        (aa.cbam, lambda p: p.pop("w_spatial"), {}, ValueError, "w_spatial"),
        (aa.cbam, lambda p: None, {"pool_order": "mean_max"}, ValueError, "pool_order"),
        (aa.spatial_pyramid_attention, lambda p: None, {"levels": (1, 2)}, ValueError, "w1"),
        (aa.spatial_pyramid_attention, lambda p: None, {"levels": ()}, ValueError, "levels"),
        (
            aa.attention_condenser,
            lambda p: p.update(scale=np.ones(3)),
            {"pool_size": 2},
            ValueError,
            "scale",
        ),
        (
            aa.attention_condenser,
            lambda p: p.update(w_point=p["w_point"][:, :2]),
            {"pool_size": 2},
            ValueError,
            "w_point",
        ),
        (
            aa.attention_condenser,
            lambda p: p.update(w_expand=p["w_expand"][:2]),
            {"pool_size": 2},
            ValueError,
            "w_expand",
        ),
        (
            aa.attention_condenser,
            lambda p: p.update(w_embed=p["w_embed"][:, :, :2]),
            {"pool_size": 2},
            ValueError,
            "w_embed",
        ),
        (
            aa.attention_condenser,
            lambda p: None,
            {"pool_size": 2, "selective": "gated"},
            ValueError,
            "selective",
        ),
        (aa.attention_condenser, lambda p: None, {"pool_size": 0}, ValueError, "pool_size"),
        (aa.attention_condenser, lambda p: None, {"pool_size": 20}, ValueError, "pool_size"),
    ],
)
def test_bad_params(rng, op, mutate, kwargs, exc, match):
    x = rng.standard_normal((2, 4, 6, 6))
    if op is aa.attention_condenser:
        p = condenser_params(rng)
    elif op is aa.spatial_pyramid_attention:
        p = mlp_params(rng, 21 * 4, 3, 4)
    elif op is aa.cbam:
        p = cbam_params(rng, 4, 2)
    else:
        p = mlp_params(rng, 4, 2, 4)
    mutate(p)
    with pytest.raises(exc, match=match):
        op(x, p, **kwargs)


def test_bad_x(rng):
    p = mlp_params(rng, 4, 2, 4)
    with pytest.raises(ValueError, match="x"):
        aa.squeeze_excitation(rng.standard_normal((4, 6, 6)), p)
    with pytest.raises(ValueError, match="w1"):
        aa.squeeze_excitation(rng.standard_normal((2, 5, 6, 6)), p)
    with pytest.raises(TypeError, match="params"):
        aa.squeeze_excitation(rng.standard_normal((2, 4, 6, 6)), [1, 2])


# -- numba kernels (SE, CBAM): equal to the array_api reference, finite differences ---------------


NUMBA_SHAPES = [(2, 6, 5, 4), (1, 1, 1, 1), (3, 5, 1, 7), (2, 3, 6, 1)]


def _block_params(rng, op, c, bias, k):
    hidden = max(1, c // 2)
    return (
        cbam_params(rng, c, hidden, k=k, bias=bias)
        if op is aa.cbam
        else mlp_params(rng, c, hidden, c, bias)
    )


def _compare_backends(op, x, p, kwargs, dtype, rng):
    x = x.astype(dtype)
    p = {k: v.astype(dtype) for k, v in p.items()}
    dy = rng.standard_normal(x.shape).astype(dtype)
    out = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            y, res = op.fwd(x, p, **kwargs)
            assert res.backend == name
            out[name] = (y, op.bwd(res, dy))
    (y0, g0), (y1, g1) = out["array_api"], out["numba"]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert y1.dtype == dtype
    assert g1.x.dtype == dtype
    assert_close_rel(y1, y0, tol, "y")
    assert_close_rel(g1.x, g0.x, tol, "x")
    assert sorted(g1.params) == sorted(g0.params)
    for key in g0.params:
        assert g1.params[key].shape == p[key].shape
        assert g1.params[key].dtype == dtype
        assert_close_rel(g1.params[key], g0.params[key], tol, key)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", NUMBA_SHAPES)
@pytest.mark.parametrize(
    ("op", "kwargs", "bias", "k"),
    [
        (aa.squeeze_excitation, {}, True, 0),
        (aa.squeeze_excitation, {}, False, 0),
        (aa.cbam, {"pool_order": "avg_max"}, True, 3),
        (aa.cbam, {"pool_order": "max_avg"}, False, 7),
        (aa.cbam, {"pool_order": "max_avg"}, True, 5),
    ],
    ids=["se-bias", "se", "cbam-avg_max-bias-k3", "cbam-max_avg-k7", "cbam-max_avg-bias-k5"],
)
def test_numba_equals_reference(rng, op, kwargs, bias, k, shape, dtype):
    require_kernel(op, "numba")
    x = rng.standard_normal(shape)
    _compare_backends(op, x, _block_params(rng, op, shape[1], bias, k), kwargs, dtype, rng)


@pytest.mark.parametrize("pool_order", ["avg_max", "max_avg"])
def test_numba_cbam_ties_route_to_first_maximum(rng, pool_order):
    """Integer-valued x ties the spatial maxima; zero MLP weights make every channel gate 1/2, so
    the channel maxima tie too: both backends must route to the first maximum."""
    require_kernel(aa.cbam, "numba")
    x = rng.integers(-2, 3, size=(2, 4, 5, 6)).astype(np.float64)
    p = cbam_params(rng, 4, 2, k=3, bias=False)
    p["w1"], p["w2"] = np.zeros_like(p["w1"]), np.zeros_like(p["w2"])
    for dtype in (np.float64, np.float32):
        _compare_backends(aa.cbam, x, p, {"pool_order": pool_order}, dtype, rng)


@pytest.mark.parametrize("op", [aa.squeeze_excitation, aa.cbam], ids=lambda o: o.name)
def test_numba_directional_finite_differences(op):
    require_kernel(op, "numba")
    rng = np.random.default_rng(12)
    with aa.use_backend("numba"):
        for args, kwargs in op.examples(rng):
            _, res = op.fwd(*args, **kwargs)
            assert res.backend == "numba"
            errors = directional_errors(op, args, kwargs, rng=rng)
            assert max(errors.values()) < 1e-6, (kwargs, errors)


@pytest.mark.parametrize("op", [aa.squeeze_excitation, aa.cbam], ids=lambda o: o.name)
def test_numba_parallel_path_equals_reference(rng, monkeypatch, op):
    """The prange kernels (used above PARALLEL_MIN_WORK) agree with the reference too (float32,
    the dtype they run in production: a parallel compile costs seconds per dtype)."""
    require_kernel(op, "numba")
    kernels = pytest.importorskip("arrayattn.backends.numba.channel")
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)
    x = rng.standard_normal((3, 5, 4, 6))
    kwargs = {"pool_order": "max_avg"} if op is aa.cbam else {}
    _compare_backends(op, x, _block_params(rng, op, 5, True, 3), kwargs, np.float32, rng)


@pytest.mark.parametrize("op", [aa.squeeze_excitation, aa.cbam], ids=lambda o: o.name)
def test_numba_non_finite_like_reference(rng, op):
    """A NaN and an inf in x give NaN/inf at the same places as the reference (max pools take a
    NaN as the maximum, as max/argmax); the finite entries agree."""
    require_kernel(op, "numba")
    x = rng.standard_normal((3, 4, 5, 6))
    x[1, 2, 3, 4], x[2, 1, 0, 0] = np.nan, np.inf
    p = _block_params(rng, op, 4, False, 3)
    out = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name), np.errstate(all="ignore"):
            y, res = op.fwd(x, p)
            g = op.bwd(res, np.ones_like(y))
            out[name] = [y, g.x, *(g.params[k] for k in sorted(p))]
    for a, b in zip(out["numba"], out["array_api"], strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-12, atol=1e-12)

"""Tests of the differentiable array primitives (conv2d, pools, upsampling, linear, layer norm,
activations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from arrayattn._xp import namespace_name
from support import RTOL, assert_close_rel, require_kernel, to_xp

torch = pytest.importorskip("torch")
F = torch.nn.functional

OPS = [
    aa.conv2d,
    aa.linear,
    aa.layer_norm,
    aa.sigmoid,
    aa.relu,
    aa.tanh,
    aa.elu,
    aa.max_pool2d,
    aa.avg_pool2d,
    aa.adaptive_avg_pool2d,
    aa.adaptive_max_pool2d,
    aa.upsample_nearest2d,
    aa.upsample_bilinear2d,
]


# -- dense float64 oracles written from the definitions -------------------------------------------


def conv2d_oracle(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Loop over output positions of y[n,o,p,q] = b[o] + Σ w[o,c,i,j] x_pad[n, g·Cg + c, s p + d
    i, s q + d j]."""
    s, pd, d = (
        (stride,) * 2 if isinstance(stride, int) else stride,
        (padding,) * 2 if isinstance(padding, int) else padding,
        (dilation,) * 2 if isinstance(dilation, int) else dilation,
    )
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (pd[0], pd[0]), (pd[1], pd[1])))
    ho = (h + 2 * pd[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (wd + 2 * pd[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    og = o // groups
    y = np.zeros((n, o, ho, wo))
    for oc in range(o):
        g = oc // og
        for p in range(ho):
            for q in range(wo):
                patch = xp_[
                    :,
                    g * cg : (g + 1) * cg,
                    p * s[0] : p * s[0] + d[0] * (kh - 1) + 1 : d[0],
                    q * s[1] : q * s[1] + d[1] * (kw - 1) + 1 : d[1],
                ]
                y[:, oc, p, q] = np.einsum("ncij,cij->n", patch, w[oc])
    if b is not None:
        y += b[None, :, None, None]
    return y


def pool_oracle(x, k, s, reduce, pad=0, fill=0.0):
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    ho = (x.shape[2] + 2 * pad - k) // s + 1
    wo = (x.shape[3] + 2 * pad - k) // s + 1
    return np.array(
        [
            [
                [
                    [reduce(xp_[a, b, p * s : p * s + k, q * s : q * s + k]) for q in range(wo)]
                    for p in range(ho)
                ]
                for b in range(x.shape[1])
            ]
            for a in range(x.shape[0])
        ]
    )


def adaptive_oracle(x, o, reduce):
    h, w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (o, o))
    for i in range(o):
        for j in range(o):
            h0, h1 = math.floor(i * h / o), math.ceil((i + 1) * h / o)
            w0, w1 = math.floor(j * w / o), math.ceil((j + 1) * w / o)
            out[..., i, j] = reduce(x[..., h0:h1, w0:w1], axis=(-2, -1))
    return out


# -- forward vs oracles and vs torch.nn.functional ------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(c=4, o=6, k=3, stride=1, padding=1, dilation=1, groups=1),
        dict(c=4, o=6, k=3, stride=2, padding=(0, 2), dilation=(1, 2), groups=2),
        dict(c=4, o=4, k=3, stride=1, padding=2, dilation=2, groups=4),  # depthwise
        dict(c=4, o=8, k=1, stride=(2, 3), padding=0, dilation=1, groups=1),
        dict(c=2, o=1, k=7, stride=1, padding=3, dilation=1, groups=1),  # CBAM's spatial conv
    ],
)
def test_conv2d_forward_backward(rng, cfg):
    x = rng.standard_normal((2, cfg["c"], 9, 8))
    w = rng.standard_normal((cfg["o"], cfg["c"] // cfg["groups"], cfg["k"], cfg["k"]))
    b = rng.standard_normal(cfg["o"])
    kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    y, res = aa.conv2d.fwd(x, w, b, **kw)
    assert_close_rel(y, conv2d_oracle(x, w, b, **kw), 1e-12, "y")
    dy = rng.standard_normal(y.shape)
    g = aa.conv2d.bwd(res, dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch.autograd.backward(F.conv2d(xt, wt, bt, **kw), torch.tensor(dy))
    for name, t in (("x", xt), ("weight", wt), ("bias", bt)):
        assert_close_rel(getattr(g, name), t.grad.numpy(), 1e-12, name)


@pytest.mark.parametrize(
    ("n", "cfg"),
    [
        (1, dict(c=3, o=2, k=1, stride=1, padding=1, dilation=1, groups=1)),  # 1×1 with padding
        (1, dict(c=2, o=3, k=3, stride=1, padding=0, dilation=1, groups=1)),
        (3, dict(c=6, o=4, k=2, stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2)),
        (2, dict(c=1, o=1, k=3, stride=3, padding=1, dilation=1, groups=1)),  # stride > kernel
    ],
)
def test_conv2d_layouts(rng, n, cfg):
    """Batch sizes and options where the channel-major im2col layout could yield views or
    non-contiguous results: values against torch, C-contiguous fresh outputs."""
    x = rng.standard_normal((n, cfg["c"], 7, 6))
    w = rng.standard_normal((cfg["o"], cfg["c"] // cfg["groups"], cfg["k"], cfg["k"]))
    b = rng.standard_normal(cfg["o"])
    kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    y, res = aa.conv2d.fwd(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    g = aa.conv2d.bwd(res, dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.conv2d(xt, wt, bt, **kw)
    torch.autograd.backward(yt, torch.tensor(dy))
    assert_close_rel(y, yt.detach().numpy(), 1e-12, "y")
    for name, t in (("x", xt), ("weight", wt), ("bias", bt)):
        assert_close_rel(getattr(g, name), t.grad.numpy(), 1e-12, name)
    for a in (y, g.x, g.weight, g.bias):
        assert a.flags.c_contiguous
        assert not any(np.shares_memory(a, i) for i in (x, w, b, dy))


CONV_BACKEND_CASES = [
    dict(n=2, c=4, o=6, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(n=2, c=4, o=6, k=3, stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=2),
    dict(n=3, c=4, o=8, k=3, stride=1, padding=2, dilation=2, groups=4),  # depthwise, multiplier 2
    dict(n=1, c=4, o=8, k=1, stride=(2, 3), padding=0, dilation=1, groups=1),
    dict(n=5, c=6, o=4, k=2, stride=3, padding=(1, 0), dilation=(2, 1), groups=2),
    dict(n=2, c=2, o=1, k=7, stride=1, padding=3, dilation=1, groups=1),
]


@pytest.mark.parametrize("cfg", CONV_BACKEND_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", ["serial", "parallel_small_tiles"])
def test_conv2d_numba_equals_array_api(rng, cfg, dtype, path, monkeypatch):
    """numba == array_api for both dtypes, serial and parallel kernels, one-row and multi-row
    tiles (several tiles per image, a partial last tile) and several backward chunks."""
    require_kernel(aa.conv2d, "numba")
    from arrayattn.backends.numba import primitives as conv_kernels

    if path == "parallel_small_tiles":
        monkeypatch.setattr(conv_kernels, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(conv_kernels, "TILE_ELEMENTS", 1)
        monkeypatch.setattr(conv_kernels, "MIN_TILE_PIXELS", 9)  # 2 rows of 8 (or fewer) outputs
        monkeypatch.setattr(conv_kernels, "MAX_BWD_CHUNKS", 2)
    else:
        monkeypatch.setattr(conv_kernels, "PARALLEL_MIN_WORK", 1 << 62)
    x = rng.standard_normal((cfg["n"], cfg["c"], 9, 8)).astype(dtype)
    w = rng.standard_normal((cfg["o"], cfg["c"] // cfg["groups"], cfg["k"], cfg["k"])).astype(dtype)
    b = rng.standard_normal(cfg["o"]).astype(dtype)
    kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    out = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            y, res = aa.conv2d.fwd(x, w, b, **kw)
            assert res.backend == name
            if "dy" not in out:
                out["dy"] = rng.standard_normal(y.shape).astype(dtype)
            out[name] = (y, aa.conv2d.bwd(res, out["dy"]))
    (y0, g0), (y1, g1) = out["array_api"], out["numba"]
    tol = RTOL[dtype]
    assert y1.dtype == dtype
    assert y1.flags.c_contiguous
    assert_close_rel(y1, y0, tol, "y")
    for name in ("x", "weight", "bias"):
        assert getattr(g1, name).dtype == dtype
        assert_close_rel(getattr(g1, name), getattr(g0, name), tol, name)


def test_conv2d_numerical_gradient(rng):
    x = rng.standard_normal((1, 2, 5, 4))
    w = rng.standard_normal((2, 1, 3, 3))
    kw = dict(stride=2, padding=1, groups=2)
    y, res = aa.conv2d.fwd(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    g = aa.conv2d.bwd(res, dy)
    num_x = numerical_gradient(lambda a: float(np.sum(aa.conv2d(a, w, **kw) * dy)), x)
    num_w = numerical_gradient(lambda a: float(np.sum(aa.conv2d(x, a, **kw) * dy)), w)
    np.testing.assert_allclose(g.x, num_x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(g.weight, num_w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("k", "s", "pad"), [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_pools_vs_oracle(rng, k, s, pad):
    x = rng.standard_normal((2, 3, 7, 8))
    assert_close_rel(aa.max_pool2d(x, k, s, pad), pool_oracle(x, k, s, np.max, pad, -np.inf), 1e-15)
    assert_close_rel(
        aa.avg_pool2d(x, k, s, pad),
        pool_oracle(x, k, s, np.mean, pad, 0.0)
        if pad == 0
        else pool_oracle(x, k, s, np.sum, pad) / (k * k),
        1e-14,
    )


@pytest.mark.parametrize("o", [1, 2, 3, 4, 5])
def test_adaptive_pools_vs_oracle(rng, o):
    x = rng.standard_normal((2, 3, 7, 9))[..., :7, :7]
    assert_close_rel(aa.adaptive_avg_pool2d(x, o), adaptive_oracle(x, o, np.mean), 1e-14)
    assert_close_rel(aa.adaptive_max_pool2d(x, o), adaptive_oracle(x, o, np.max), 0)


def _torch_grad(fn, x, dy):
    xt = torch.tensor(x, requires_grad=True)
    y = fn(xt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize(
    ("name", "ours", "theirs"),
    [
        (
            "maxpool",
            lambda x: aa.max_pool2d.fwd(x, (3, 2), (2, 1), (1, 1), dilation=(1, 2)),
            lambda t: F.max_pool2d(t, (3, 2), (2, 1), (1, 1), dilation=(1, 2)),
        ),
        (
            "avgpool",
            lambda x: aa.avg_pool2d.fwd(x, 3, 2, 1, count_include_pad=False),
            lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False),
        ),
        (
            "aavg",
            lambda x: aa.adaptive_avg_pool2d.fwd(x, (4, 3)),
            lambda t: F.adaptive_avg_pool2d(t, (4, 3)),
        ),
        (
            "amax",
            lambda x: aa.adaptive_max_pool2d.fwd(x, (4, 3)),
            lambda t: F.adaptive_max_pool2d(t, (4, 3)),
        ),
        (
            "nearest",
            lambda x: aa.upsample_nearest2d.fwd(x, (17, 11)),
            lambda t: F.interpolate(t, (17, 11), mode="nearest"),
        ),
        (
            "nearest_sf",
            lambda x: aa.upsample_nearest2d.fwd(x, scale_factor=2),
            lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        ),
        (
            "bilinear",
            lambda x: aa.upsample_bilinear2d.fwd(x, (13, 20)),
            lambda t: F.interpolate(t, (13, 20), mode="bilinear"),
        ),
        (
            "bilinear_down",
            lambda x: aa.upsample_bilinear2d.fwd(x, (4, 3)),
            lambda t: F.interpolate(t, (4, 3), mode="bilinear"),
        ),
        (
            "bilinear_ac",
            lambda x: aa.upsample_bilinear2d.fwd(x, (13, 20), align_corners=True),
            lambda t: F.interpolate(t, (13, 20), mode="bilinear", align_corners=True),
        ),
        (
            "bilinear_sf",
            lambda x: aa.upsample_bilinear2d.fwd(x, scale_factor=1.5),
            lambda t: F.interpolate(t, scale_factor=1.5, mode="bilinear"),
        ),
        ("sigmoid", lambda x: aa.sigmoid.fwd(x), torch.sigmoid),
        ("relu", lambda x: aa.relu.fwd(x), torch.relu),
        ("tanh", lambda x: aa.tanh.fwd(x), torch.tanh),
        ("elu", lambda x: aa.elu.fwd(x, alpha=0.7), lambda t: F.elu(t, 0.7)),
        (
            "layer_norm",
            lambda x: aa.layer_norm.fwd(x, eps=1e-3),
            lambda t: F.layer_norm(t, (t.shape[-1],), eps=1e-3),
        ),
    ],
)
def test_vs_torch_functional(rng, name, ours, theirs):
    x = rng.standard_normal((2, 3, 7, 9)) * 2
    y, res = ours(x)
    dy = rng.standard_normal(y.shape)
    ty, tdx = _torch_grad(theirs, x, dy)
    assert_close_rel(y, ty, 1e-13, "y")
    assert_close_rel(getattr(aa, res.op).bwd(res, dy).x, tdx, 1e-13, "dx")


def test_linear_and_layer_norm_params_vs_torch(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal((6, 5)), rng.standard_normal(6)
    y, res = aa.linear.fwd(x, w, b)
    dy = rng.standard_normal(y.shape)
    g = aa.linear.bwd(res, dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    F.linear(xt, wt, bt).backward(torch.tensor(dy))
    for ours, t in (
        (y, F.linear(xt, wt, bt)),
        (g.x, xt.grad),
        (g.weight, wt.grad),
        (g.bias, bt.grad),
    ):
        assert_close_rel(ours, t.detach().numpy(), 1e-13)
    lw, lb = rng.standard_normal(5), rng.standard_normal(5)
    y, res = aa.layer_norm.fwd(x, lw, lb)
    dy = rng.standard_normal(y.shape)
    g = aa.layer_norm.bwd(res, dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, lw, lb))
    ty = F.layer_norm(xt, (5,), wt, bt)
    ty.backward(torch.tensor(dy))
    for ours, t in ((y, ty), (g.x, xt.grad), (g.weight, wt.grad), (g.bias, bt.grad)):
        assert_close_rel(ours, t.detach().numpy(), 1e-12)


def test_sigmoid_extremes_and_max_ties():
    y = aa.sigmoid(np.array([-1000.0, 1000.0], dtype=np.float32))
    assert np.all(np.isfinite(y))
    assert y[0] == 0
    assert y[1] == 1
    # ties: the gradient goes to the first maximum only (no double counting)
    x = np.ones((1, 1, 2, 2))
    _, res = aa.max_pool2d.fwd(x, 2)
    np.testing.assert_array_equal(
        aa.max_pool2d.bwd(res, np.ones((1, 1, 1, 1))).x, [[[[1, 0], [0, 0]]]]
    )
    _, res = aa.adaptive_max_pool2d.fwd(x, 1)
    np.testing.assert_array_equal(
        aa.adaptive_max_pool2d.bwd(res, np.ones((1, 1, 1, 1))).x, [[[[1, 0], [0, 0]]]]
    )


# -- finite differences on every op's examples ----------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_directional_finite_differences(op):
    rng = np.random.default_rng(3)
    for args, kwargs in op.examples(rng):
        errors = directional_errors(op, args, kwargs, rng=rng)
        assert max(errors.values()) < 1e-6, errors


# -- namespaces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_reference_on_namespaces(xp, op):
    rng = np.random.default_rng(5)
    examples = op.examples(rng)
    if namespace_name(xp) == "jax":  # eager jax dispatch is slow: one call per op there
        examples = examples[:1]
    for args, kwargs in examples:
        y_np, res_np = op.fwd(*args, **kwargs)
        dy = rng.standard_normal(y_np.shape)
        g_np = op.bwd(res_np, dy)
        xargs = tuple(to_xp(xp, a) if isinstance(a, np.ndarray) else a for a in args)
        y, res = op.fwd(*xargs, **kwargs)
        assert_close_rel(y, y_np, 1e-12, "y")
        g = op.bwd(res, to_xp(xp, dy))
        for name in op.differentiable:
            ref = getattr(g_np, name)
            if ref is not None:
                assert_close_rel(getattr(g, name), ref, 1e-12, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_dtypes(rng, dtype):
    x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
    w = (rng.standard_normal((3, 4, 3, 3)) / 6).astype(dtype)
    y, res = aa.conv2d.fwd(x, w, padding=1)
    assert y.dtype == dtype
    g = aa.conv2d.bwd(res, np.ones_like(y))
    assert g.x.dtype == dtype
    assert g.weight.dtype == dtype
    ref = conv2d_oracle(x.astype(np.float64), w.astype(np.float64), padding=1)
    assert_close_rel(y, ref, 1e-5 if dtype == np.float32 else 2e-3)


def test_read_only_inputs_unchanged(rng):
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((2, 2, 3, 3))
    for a in (x, w):
        a.flags.writeable = False
    x0, w0 = x.copy(), w.copy()
    y, res = aa.conv2d.fwd(x, w, padding=1)
    aa.conv2d.bwd(res, np.ones_like(y))
    for op, args in (
        (aa.max_pool2d, (x, 1)),
        (aa.relu, (x,)),
        (aa.adaptive_avg_pool2d, (x, 5)),
        (aa.upsample_nearest2d, (x, (5, 5))),
    ):
        y, res = op.fwd(*args)
        assert not np.shares_memory(y, x), op.name
        op.bwd(res, np.ones_like(y))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


# -- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda x, w: aa.conv2d(x[0], w), ValueError, "x"),
        (lambda x, w: aa.conv2d(x, w[:, :1]), ValueError, "weight"),
        (lambda x, w: aa.conv2d(x, w, groups=3), ValueError, "groups"),
        (lambda x, w: aa.conv2d(x, w, np.ones(2)), ValueError, "bias"),
        (lambda x, w: aa.conv2d(x, w, stride=0), ValueError, "stride"),
        (lambda x, w: aa.conv2d(x, w, padding=(1, 2, 3)), ValueError, "padding"),
        (lambda x, w: aa.conv2d(x, w.astype(np.float32)), TypeError, "weight"),
        (lambda x, w: aa.conv2d(x.astype(int), w), TypeError, "x"),
        (lambda x, w: aa.conv2d(x, torch.tensor(w)), TypeError, "namespace"),
        (lambda x, w: aa.conv2d(x[..., :1, :1], w), ValueError, "x"),
        (lambda x, w: aa.max_pool2d(x, 2, padding=2), ValueError, "padding"),
        (lambda x, w: aa.avg_pool2d(x, 0), ValueError, "kernel_size"),
        (lambda x, w: aa.adaptive_avg_pool2d(x, 0), ValueError, "output_size"),
        (lambda x, w: aa.upsample_nearest2d(x), ValueError, "size"),
        (lambda x, w: aa.upsample_bilinear2d(x, 4, align_corners=1), TypeError, "align_corners"),
        (lambda x, w: aa.linear(x, w[0, 0]), ValueError, "weight"),
        (lambda x, w: aa.layer_norm(x, np.ones(3)), ValueError, "weight"),
        (lambda x, w: aa.layer_norm(x, eps=-1.0), ValueError, "eps"),
        (lambda x, w: aa.sigmoid([1.0]), TypeError, "x"),
    ],
)
def test_bad_inputs(rng, call, exc, match):
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((4, 4, 3, 3))
    with pytest.raises(exc, match=match):
        call(x, w)

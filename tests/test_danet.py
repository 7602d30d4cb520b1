"""Tests of DANet's position (PAM) and channel (CAM) attention modules."""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._glue.danet import example_pam_params
from arrayattn._gradcheck import numerical_gradient
from arrayattn._xp import namespace_name
from support import assert_close_rel, directional_check, to_numpy, to_xp

torch = pytest.importorskip("torch")


# -- dense float64 oracles written from the spec formulas -----------------------------------------


def softmax(s, axis=-1):
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def conv1x1(x, w, b=None):
    y = np.einsum("oc,ncp->nop", w[:, :, 0, 0], x)
    return y if b is None else y + b[None, :, None]


def pam_oracle(x, p):
    n, c, h, w = x.shape
    a = x.reshape(n, c, h * w)
    b_ = conv1x1(a, p["w_query"], p.get("b_query"))
    c_ = conv1x1(a, p["w_key"], p.get("b_key"))
    d_ = conv1x1(a, p["w_value"], p.get("b_value"))
    s = softmax(np.einsum("nci,ncj->nij", b_, c_))  # s[i, j]: query position i, key position j
    e = p["gamma"][0] * np.einsum("ncj,nij->nci", d_, s) + a
    return e.reshape(x.shape)


def cam_oracle(x, gamma, logits="paper"):
    n, c, h, w = x.shape
    a = x.reshape(n, c, h * w)
    energy = a @ a.transpose(0, 2, 1)
    if logits == "code":  # the official code, literally: rowmax(E) - E, then softmax
        energy = energy.max(axis=-1, keepdims=True) - energy
    att = softmax(energy)
    return (np.reshape(gamma, ()) * att @ a + a).reshape(x.shape)


# -- PyTorch re-implementation of junfu1115/DANet encoding/nn/da_att.py (same weights) ------------


class TorchPAM(torch.nn.Module):
    def __init__(self, c, cq):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(c, cq, 1)
        self.key_conv = torch.nn.Conv2d(c, cq, 1)
        self.value_conv = torch.nn.Conv2d(c, c, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        proj_query = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(b, -1, w * h)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(b, -1, w * h)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x


class TorchCAM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        proj_query = x.view(b, c, -1)
        proj_key = x.view(b, c, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = self.softmax(energy_new)
        out = torch.bmm(attention, x.view(b, c, -1)).view(b, c, h, w)
        return self.gamma * out + x


# -- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "cq", "bias"),
    [((2, 8, 3, 5), 2, True), ((1, 4, 1, 1), 1, False), ((3, 6, 4, 1), 3, True)],
)
def test_pam_oracle(rng, backend, shape, cq, bias):
    x = rng.standard_normal(shape)
    p = example_pam_params(rng, shape[1], cq, bias=bias)
    p["b_key"] = rng.standard_normal(cq) if bias else None
    p = {k: v for k, v in p.items() if v is not None}
    assert_close_rel(aa.position_attention(x, p), pam_oracle(x, p), 1e-12)


@pytest.mark.parametrize("logits", ["paper", "code"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 1, 2, 2), (2, 7, 1, 1)])
def test_cam_oracle(rng, backend, shape, logits):
    x = rng.standard_normal(shape) / 2
    gamma = rng.standard_normal(1)
    assert_close_rel(
        aa.channel_attention(x, gamma, logits=logits), cam_oracle(x, gamma, logits), 1e-12
    )


def test_cam_rowmax_identity(rng):
    """softmax(rowmax(E) - E) = softmax(-E): DANet's code attends with negated affinities."""
    for scale in (1.0, 30.0):
        a = scale * rng.standard_normal((3, 6, 20))
        e = a @ a.transpose(0, 2, 1)
        code = softmax(e.max(axis=-1, keepdims=True) - e)
        np.testing.assert_allclose(code, softmax(-e), rtol=1e-12, atol=1e-300)
        assert not np.allclose(code, softmax(e))  # and it is not the paper's softmax(E)
    # the identity gives the op's 'code' mode its meaning: paper(-ish) vs code genuinely differ
    x = rng.standard_normal((1, 4, 3, 3))
    g = np.array([1.0])
    assert not np.allclose(aa.channel_attention(x, g), aa.channel_attention(x, g, logits="code"))


def test_cam_huge_logits(rng, backend):
    """A Aᵀ of order 1e4: the softmax is stable (no inf/NaN) and matches the oracle."""
    x = 20.0 * rng.standard_normal((2, 6, 6, 5))
    gamma = np.array([0.9])
    for logits in ("paper", "code"):
        y, res = aa.channel_attention.fwd(x, gamma, logits=logits)
        assert np.all(np.isfinite(y))
        assert_close_rel(y, cam_oracle(x, gamma, logits), 1e-12)
        g = aa.channel_attention.bwd(res, np.ones_like(y))
        assert np.all(np.isfinite(g.x))
        assert np.all(np.isfinite(g.gamma))


def test_gamma_zero_is_identity(rng):
    """γ = 0 (DANet's init): y = x, dx = dy, zero gradients for every weight but γ."""
    x = rng.standard_normal((2, 8, 3, 4))
    p = example_pam_params(rng, 8, 2, gamma=0.0)
    dy = rng.standard_normal(x.shape)
    y, res = aa.position_attention.fwd(x, p)
    np.testing.assert_array_equal(y, x)
    g = aa.position_attention.bwd(res, dy)
    np.testing.assert_array_equal(g.x, dy)
    for key in ("w_query", "w_key", "w_value", "b_query", "b_value"):
        np.testing.assert_array_equal(g.params[key], 0)
    assert g.params["gamma"][0] != 0
    y, res = aa.channel_attention.fwd(x, np.zeros(1))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(aa.channel_attention.bwd(res, dy).x, dy)


# -- against the official code's semantics (PyTorch, same weights) ---------------------------------


def _torch_grads(module, x, dy):
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy()


def test_pam_vs_official_torch(rng, backend):
    c, cq = 16, 2
    x = rng.standard_normal((2, c, 5, 6))
    m = TorchPAM(c, cq).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    p = {
        "w_query": m.query_conv.weight.detach().numpy(),
        "b_query": m.query_conv.bias.detach().numpy(),
        "w_key": m.key_conv.weight.detach().numpy(),
        "b_key": m.key_conv.bias.detach().numpy(),
        "w_value": m.value_conv.weight.detach().numpy(),
        "b_value": m.value_conv.bias.detach().numpy(),
        "gamma": m.gamma.detach().numpy(),
    }
    dy = rng.standard_normal(x.shape)
    y_t, dx_t = _torch_grads(m, x, dy)
    y, res = aa.position_attention.fwd(x, p)
    g = aa.position_attention.bwd(res, dy)
    assert_close_rel(y, y_t, 1e-12)
    assert_close_rel(g.x, dx_t, 1e-10)
    torch_names = {
        "w_query": m.query_conv.weight,
        "b_query": m.query_conv.bias,
        "w_key": m.key_conv.weight,
        "w_value": m.value_conv.weight,
        "b_value": m.value_conv.bias,
        "gamma": m.gamma,
    }
    for key, param in torch_names.items():
        assert_close_rel(g.params[key], param.grad.numpy(), 1e-10, key)
    # b_key: exactly zero in exact arithmetic for both; compare on the scale of the other grads
    assert np.max(np.abs(g.params["b_key"] - m.key_conv.bias.grad.numpy())) < 1e-10 * np.max(
        np.abs(dx_t)
    )


def test_cam_vs_official_torch(rng, backend):
    x = rng.standard_normal((2, 6, 4, 5))
    m = TorchCAM().double()
    with torch.no_grad():
        m.gamma.fill_(-0.6)
    dy = rng.standard_normal(x.shape)
    y_t, dx_t = _torch_grads(m, x, dy)
    y, res = aa.channel_attention.fwd(x, m.gamma.detach().numpy(), logits="code")
    g = aa.channel_attention.bwd(res, dy)
    assert_close_rel(y, y_t, 1e-12)
    assert_close_rel(g.x, dx_t, 1e-10)
    assert_close_rel(g.gamma, m.gamma.grad.numpy(), 1e-10)


# -- gradients by finite differences ---------------------------------------------------------------


def test_pam_elementwise_gradients(rng):
    x = rng.standard_normal((1, 4, 2, 3))
    p = example_pam_params(rng, 4, 2)
    dy = rng.standard_normal(x.shape)
    _, res = aa.position_attention.fwd(x, p)
    g = aa.position_attention.bwd(res, dy)
    num = numerical_gradient(lambda a: float(np.sum(aa.position_attention(a, p) * dy)), x)
    assert_close_rel(g.x, num, 1e-8, "x")
    for key in p:
        num = numerical_gradient(
            lambda a: float(np.sum(aa.position_attention(x, {**p, key: a}) * dy)), p[key]
        )
        assert_close_rel(g.params[key], num, 1e-7, key)


@pytest.mark.parametrize("logits", ["paper", "code"])
@pytest.mark.parametrize("gamma_shape", [(1,), ()])
def test_cam_elementwise_gradients(rng, logits, gamma_shape):
    x = rng.standard_normal((2, 3, 2, 3))
    gamma = rng.standard_normal(gamma_shape)
    dy = rng.standard_normal(x.shape)
    _, res = aa.channel_attention.fwd(x, gamma, logits=logits)
    g = aa.channel_attention.bwd(res, dy)
    f = lambda a, gm: float(np.sum(aa.channel_attention(a, gm, logits=logits) * dy))  # noqa: E731
    assert_close_rel(g.x, numerical_gradient(lambda a: f(a, gamma), x), 1e-8, "x")
    assert g.gamma.shape == gamma_shape
    assert_close_rel(g.gamma, numerical_gradient(lambda gm: f(x, gm), gamma), 1e-8, "gamma")


def test_directional(rng, backend):
    x = rng.standard_normal((2, 8, 3, 4))
    p = example_pam_params(rng, 8, 2)
    p["b_key"] = rng.standard_normal(2)  # exactly-zero gradient: judged against floor 1
    directional_check(aa.position_attention, (x, p), {}, rng)
    for logits in ("paper", "code"):
        directional_check(
            aa.channel_attention, (x / 2, rng.standard_normal(1)), {"logits": logits}, rng
        )


def test_backends_agree(rng):
    """numba (for the SDPA core) and array_api give the same forward and gradients."""
    from support import has_kernel

    if not has_kernel(aa.scaled_dot_product_attention, "numba"):
        pytest.skip("no numba SDPA kernel here")
    x = rng.standard_normal((2, 8, 5, 6))
    p = example_pam_params(rng, 8, 2)
    dy = rng.standard_normal(x.shape)
    results = {}
    for b in ("array_api", "numba"):
        with aa.use_backend(b):
            y, res = aa.position_attention.fwd(x, p)
            g = aa.position_attention.bwd(res, dy)
            yc, resc = aa.channel_attention.fwd(x, p["gamma"], logits="code")
            gc = aa.channel_attention.bwd(resc, dy)
        results[b] = (y, g.x, g.params["w_key"], yc, gc.x, gc.gamma)
    for a, b in zip(results["array_api"], results["numba"], strict=True):
        assert_close_rel(b, a, 1e-10)


# -- namespaces, dtypes, inputs --------------------------------------------------------------------


def test_reference_on_namespaces(xp, rng):
    if namespace_name(xp) == "jax":
        pytest.importorskip("jax")
    x = rng.standard_normal((2, 8, 3, 4))
    p = example_pam_params(rng, 8, 2)
    dy = rng.standard_normal(x.shape)
    with aa.use_backend("array_api"):
        y, res = aa.position_attention.fwd(to_xp(xp, x), to_xp(xp, p))
        g = aa.position_attention.bwd(res, to_xp(xp, dy))
        yc, resc = aa.channel_attention.fwd(to_xp(xp, x), to_xp(xp, p["gamma"]), logits="code")
        gc = aa.channel_attention.bwd(resc, to_xp(xp, dy))
    assert_close_rel(to_numpy(y), pam_oracle(x, p), 1e-12)
    assert_close_rel(to_numpy(yc), cam_oracle(x, p["gamma"], "code"), 1e-12)
    _, res64 = aa.position_attention.fwd(x, p)
    g64 = aa.position_attention.bwd(res64, dy)
    assert_close_rel(to_numpy(g.x), g64.x, 1e-10)
    assert_close_rel(to_numpy(g.params["w_query"]), g64.params["w_query"], 1e-10)
    _, resc64 = aa.channel_attention.fwd(x, p["gamma"], logits="code")
    assert_close_rel(to_numpy(gc.x), aa.channel_attention.bwd(resc64, dy).x, 1e-10)


def test_float32(rng, backend):
    x = rng.standard_normal((2, 8, 4, 4))
    p = example_pam_params(rng, 8, 2)
    x32, p32 = x.astype(np.float32), {k: v.astype(np.float32) for k, v in p.items()}
    y = aa.position_attention(x32, p32)
    assert y.dtype == np.float32
    assert_close_rel(
        y,
        pam_oracle(x32.astype(np.float64), {k: v.astype(np.float64) for k, v in p32.items()}),
        2e-5,
    )
    yc, res = aa.channel_attention.fwd(x32, p32["gamma"])
    assert yc.dtype == np.float32
    assert_close_rel(yc, cam_oracle(x32.astype(np.float64), p32["gamma"].astype(np.float64)), 2e-5)
    g = aa.channel_attention.bwd(res, np.ones_like(yc))
    assert g.x.dtype == np.float32
    assert g.gamma.dtype == np.float32


def test_read_only_inputs(rng):
    x = rng.standard_normal((2, 8, 3, 4))
    p = example_pam_params(rng, 8, 2)
    for a in (x, *p.values()):
        a.setflags(write=False)
    copies = (x.copy(), {k: v.copy() for k, v in p.items()})
    y, res = aa.position_attention.fwd(x, p)
    aa.position_attention.bwd(res, np.ones_like(y))
    y2, res2 = aa.channel_attention.fwd(x, p["gamma"])
    g2 = aa.channel_attention.bwd(res2, np.ones_like(y2))
    np.testing.assert_array_equal(x, copies[0])
    for k in p:
        np.testing.assert_array_equal(p[k], copies[1][k])
    assert not np.shares_memory(y2, x)
    assert not np.shares_memory(g2.x, x)


def _pam_bad(rng):
    x = rng.standard_normal((2, 8, 3, 4))
    return x, example_pam_params(rng, 8, 2)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda x, p: (x, {k: v for k, v in p.items() if k != "gamma"}), ValueError, "gamma"),
        (lambda x, p: (x, {**p, "w_key": p["w_key"][:1]}), ValueError, "w_key"),
        (lambda x, p: (x, {**p, "w_value": p["w_value"][:, :, 0, 0]}), ValueError, "w_value"),
        (lambda x, p: (x, {**p, "b_value": p["b_value"][:3]}), ValueError, "b_value"),
        (lambda x, p: (x, {**p, "w_extra": p["w_key"]}), ValueError, "w_extra"),
        (lambda x, p: (x, {**p, "gamma": p["gamma"].astype(np.float32)}), TypeError, "gamma"),
        (lambda x, p: (x[0], p), ValueError, "x"),
        (lambda x, p: (x.astype(np.int64), p), TypeError, "x"),
        (lambda x, p: (x, [1, 2]), TypeError, "params"),
    ],
)
def test_pam_bad_inputs(rng, mutate, exc, match):
    args = mutate(*_pam_bad(rng))
    with pytest.raises(exc, match=match):
        aa.position_attention(*args)


def test_cam_bad_inputs(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    with pytest.raises(ValueError, match="logits"):
        aa.channel_attention(x, np.ones(1), logits="neg")
    with pytest.raises(ValueError, match="gamma"):
        aa.channel_attention(x, np.ones(2))
    with pytest.raises(TypeError, match="gamma"):
        aa.channel_attention(x, 0.5)
    with pytest.raises(TypeError, match="gamma"):
        aa.channel_attention(x, np.ones(1, dtype=np.float32))
    with pytest.raises(ValueError, match="x"):
        aa.channel_attention(x[0], np.ones(1))
    with pytest.raises(TypeError, match="namespaces"):
        aa.channel_attention(torch.tensor(x), np.ones(1))

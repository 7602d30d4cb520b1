"""Tests of the non-local block (derivation: docs/derivations/non_local.rst): four pairwise
functions, max-pool subsampling."""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._glue.non_local import example_params
from arrayattn._gradcheck import numerical_gradient
from support import assert_close_rel, directional_check, to_numpy, to_xp

torch = pytest.importorskip("torch")

MODES = ["embedded_gaussian", "gaussian", "dot", "concat"]
NL = aa.non_local_block


# -- dense float64 oracle from the spec table (section 9.1) ----------------------------------------


def conv1x1(x, w, b=None):
    y = np.einsum("oc,ncp->nop", w[:, :, 0, 0], x)
    return y if b is None else y + b[None, :, None]


def maxpool2(a, h, w):
    n, c, _ = a.shape
    m = a.reshape(n, c, h, w)[:, :, : h // 2 * 2, : w // 2 * 2]
    m = m.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    return m.reshape(n, c, -1)


def nl_oracle(x, p, mode="embedded_gaussian", subsample=False, scale=1.0):
    n, c, h, w = x.shape
    xf = x.reshape(n, c, h * w)
    if mode == "gaussian":
        theta, phi = xf, xf
    else:
        theta = conv1x1(xf, p["w_theta"], p.get("b_theta"))
        phi = conv1x1(xf, p["w_phi"], p.get("b_phi"))
    g = conv1x1(xf, p["w_g"], p.get("b_g"))
    if subsample:
        phi, g = maxpool2(phi, h, w), maxpool2(g, h, w)
    npos = phi.shape[-1]
    if mode in ("gaussian", "embedded_gaussian"):
        f = np.exp(scale * np.einsum("nci,ncj->nij", theta, phi))
        f = f / f.sum(axis=-1, keepdims=True)  # C(x) = Σ_j f
    elif mode == "dot":
        f = np.einsum("nci,ncj->nij", theta, phi) / npos
    else:
        ci = theta.shape[1]
        wf = p["w_f"][0, :, 0, 0]
        pre = (
            np.einsum("c,nci->ni", wf[:ci], theta)[:, :, None]
            + np.einsum("c,ncj->nj", wf[ci:], phi)[:, None, :]
        )
        f = np.maximum(pre, 0) / npos
    y = np.einsum("nij,ncj->nci", f, g)
    z = conv1x1(y, p["w_z"], p.get("b_z")) + xf
    return z.reshape(x.shape)


# -- PyTorch re-implementation of AlexHex7/Non-local_pytorch (lib/non_local_*.py), BN omitted ------


class TorchNonLocal(torch.nn.Module):
    """_NonLocalBlockND(dimension=2, bn_layer=False) of the four AlexHex7 files, in one class."""

    def __init__(self, c, ci, mode, sub_sample):
        super().__init__()
        self.mode, self.inter_channels = mode, ci
        pool = torch.nn.MaxPool2d(kernel_size=(2, 2))
        self.g = torch.nn.Conv2d(c, ci, 1)
        self.W = torch.nn.Conv2d(ci, c, 1)
        if mode != "gaussian":
            self.theta = torch.nn.Conv2d(c, ci, 1)
            self.phi = torch.nn.Conv2d(c, ci, 1)
        if mode == "concat":
            self.concat_project = torch.nn.Sequential(
                torch.nn.Conv2d(ci * 2, 1, 1, bias=False), torch.nn.ReLU()
            )
        if sub_sample:
            self.g = torch.nn.Sequential(self.g, pool)
            if mode == "gaussian":
                self.phi = pool
            else:
                self.phi = torch.nn.Sequential(self.phi, pool)
        self.sub_sample = sub_sample

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        if self.mode == "gaussian":
            theta_x = x.view(b, x.size(1), -1).permute(0, 2, 1)
            phi_x = (self.phi(x) if self.sub_sample else x).view(b, x.size(1), -1)
            f_div_c = torch.nn.functional.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.mode == "embedded_gaussian":
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f_div_c = torch.nn.functional.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.mode == "dot":
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.matmul(theta_x, phi_x)
            f_div_c = f / f.size(-1)
        else:
            theta_x = self.theta(x).view(b, self.inter_channels, -1, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, 1, -1)
            h, w = theta_x.size(2), phi_x.size(3)
            theta_x = theta_x.repeat(1, 1, 1, w)
            phi_x = phi_x.repeat(1, 1, h, 1)
            f = self.concat_project(torch.cat([theta_x, phi_x], dim=1))
            f = f.view(b, f.size(2), f.size(3))
            f_div_c = f / f.size(-1)
        y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()
        y = y.view(b, self.inter_channels, *x.size()[2:])
        return self.W(y) + x


def _conv(seq):
    return seq[0] if isinstance(seq, torch.nn.Sequential) else seq


def torch_params(m, mode):
    p = {"w_g": _conv(m.g).weight, "b_g": _conv(m.g).bias, "w_z": m.W.weight, "b_z": m.W.bias}
    if mode != "gaussian":
        p.update(
            w_theta=m.theta.weight,
            b_theta=m.theta.bias,
            w_phi=_conv(m.phi).weight,
            b_phi=_conv(m.phi).bias,
        )
    if mode == "concat":
        p["w_f"] = m.concat_project[0].weight
    return p


# -- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (1, 4, 2, 2)])
def test_oracle(rng, backend, mode, subsample, shape):
    x = rng.standard_normal(shape)
    p = example_params(rng, shape[1], 3, mode)
    assert_close_rel(
        NL(x, p, mode=mode, subsample=subsample), nl_oracle(x, p, mode, subsample), 1e-12
    )


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_scale(rng, backend, mode):
    """timm's NonLocalAttn scales the logits by C^{-1/2}; the option reproduces that."""
    x = rng.standard_normal((2, 8, 3, 3))
    p = example_params(rng, 8, 4, mode, bias=False)
    s = 8**-0.5
    assert_close_rel(NL(x, p, mode=mode, scale=s), nl_oracle(x, p, mode, scale=s), 1e-12)


def test_size_one_and_odd_pooling(rng):
    x = rng.standard_normal((1, 3, 1, 1))
    for mode in MODES:
        p = example_params(rng, 3, 2, mode)
        assert_close_rel(NL(x, p, mode=mode), nl_oracle(x, p, mode), 1e-12)
    x = rng.standard_normal((2, 3, 5, 3))  # floor-mode pooling drops the last row/column
    for mode in MODES:
        p = example_params(rng, 3, 2, mode)
        assert_close_rel(NL(x, p, mode=mode, subsample=True), nl_oracle(x, p, mode, True), 1e-12)


def test_zero_w_z_is_identity(rng):
    """The paper initialises the final BN scale to 0: with W_z = 0 the block is the identity."""
    x = rng.standard_normal((2, 4, 3, 3))
    p = example_params(rng, 4, 2, "embedded_gaussian", bias=False)
    p["w_z"] = np.zeros_like(p["w_z"])
    np.testing.assert_array_equal(NL(x, p), x)


# -- against AlexHex7/Non-local_pytorch semantics (same weights) -----------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("subsample", [False, True])
def test_vs_alexhex7_torch(rng, backend, mode, subsample):
    c, ci = 6, 3
    torch.manual_seed(0)
    m = TorchNonLocal(c, ci, mode, subsample).double()
    x = rng.standard_normal((2, c, 4, 6))
    dy = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = m(xt)
    yt.backward(torch.tensor(dy))
    tp = torch_params(m, mode)
    p = {k: v.detach().numpy() for k, v in tp.items()}
    z, res = NL.fwd(x, p, mode=mode, subsample=subsample)
    g = NL.bwd(res, dy)
    assert_close_rel(z, yt.detach().numpy(), 1e-12)
    assert_close_rel(g.x, xt.grad.numpy(), 1e-10)
    floor = np.max(np.abs(xt.grad.numpy()))
    for key, param in tp.items():
        # b_phi of the softmax mode has an exactly-zero gradient: compare on the scale of dx
        assert_close_rel(
            g.params[key], param.grad.numpy(), 1e-10, key, floor=floor if key == "b_phi" else 0.0
        )


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("subsample", [False, True])
def test_elementwise_gradients(rng, mode, subsample):
    x = rng.standard_normal((1, 3, 2, 4))
    p = example_params(rng, 3, 2, mode)
    dy = rng.standard_normal(x.shape)
    kw = {"mode": mode, "subsample": subsample}
    _, res = NL.fwd(x, p, **kw)
    g = NL.bwd(res, dy)
    assert_close_rel(
        g.x, numerical_gradient(lambda a: float(np.sum(NL(a, p, **kw) * dy)), x), 1e-7, "x"
    )
    for key in p:
        num = numerical_gradient(lambda a: float(np.sum(NL(x, {**p, key: a}, **kw) * dy)), p[key])
        floor = np.max(np.abs(g.x)) if (key == "b_phi" and mode == "embedded_gaussian") else 0.0
        assert_close_rel(g.params[key], num, 1e-7, key, floor=floor)


@pytest.mark.parametrize("mode", MODES)
def test_directional(rng, backend, mode):
    x = rng.standard_normal((2, 4, 4, 4))
    p = example_params(rng, 4, 2, mode)
    for subsample in (False, True):
        directional_check(NL, (x, p), {"mode": mode, "subsample": subsample}, rng)


def test_backends_agree(rng):
    from support import has_kernel

    if not has_kernel(aa.scaled_dot_product_attention, "numba"):
        pytest.skip("no numba SDPA kernel here")
    x = rng.standard_normal((2, 6, 6, 5))
    p = example_params(rng, 6, 3, "embedded_gaussian")
    dy = rng.standard_normal(x.shape)
    out = {}
    for b in ("array_api", "numba"):
        with aa.use_backend(b):
            z, res = NL.fwd(x, p, subsample=True)
            g = NL.bwd(res, dy)
        assert dict(res.nested)["attn"].backend == b  # the core ran on that backend
        out[b] = (z, g.x, g.params["w_theta"], g.params["w_g"])
    for a, b in zip(out["array_api"], out["numba"], strict=True):
        assert_close_rel(b, a, 1e-10)


# -- namespaces, dtypes, inputs --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_reference_on_namespaces(xp, rng, mode):
    x = rng.standard_normal((2, 4, 4, 3))
    p = example_params(rng, 4, 2, mode)
    dy = rng.standard_normal(x.shape)
    with aa.use_backend("array_api"):
        z, res = NL.fwd(to_xp(xp, x), to_xp(xp, p), mode=mode, subsample=True)
        g = NL.bwd(res, to_xp(xp, dy))
        z64, res64 = NL.fwd(x, p, mode=mode, subsample=True)
        g64 = NL.bwd(res64, dy)
    assert_close_rel(to_numpy(z), nl_oracle(x, p, mode, True), 1e-12)
    assert_close_rel(to_numpy(g.x), g64.x, 1e-10)
    for key in ("w_g", "w_z"):
        assert_close_rel(to_numpy(g.params[key]), g64.params[key], 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_float32(rng, backend, mode):
    x = rng.standard_normal((2, 6, 4, 4)).astype(np.float32)
    p = {k: v.astype(np.float32) for k, v in example_params(rng, 6, 3, mode).items()}
    z, res = NL.fwd(x, p, mode=mode, subsample=True)
    assert z.dtype == np.float32
    ref = nl_oracle(
        x.astype(np.float64), {k: v.astype(np.float64) for k, v in p.items()}, mode, True
    )
    assert_close_rel(z, ref, 2e-5)
    g = NL.bwd(res, np.ones_like(z))
    assert g.x.dtype == np.float32
    assert all(v.dtype == np.float32 for v in g.params.values())


def test_read_only_inputs(rng):
    x = rng.standard_normal((2, 4, 4, 4))
    for mode in MODES:
        p = example_params(rng, 4, 2, mode)
        for a in (x, *p.values()):
            a.setflags(write=False)
        before = x.copy(), {k: v.copy() for k, v in p.items()}
        z, res = NL.fwd(x, p, mode=mode, subsample=True)
        g = NL.bwd(res, np.ones_like(z))
        np.testing.assert_array_equal(x, before[0])
        for k in p:
            np.testing.assert_array_equal(p[k], before[1][k])
        assert not np.shares_memory(z, x)
        assert not np.shares_memory(g.x, x)


@pytest.mark.parametrize(
    ("mode", "mutate", "kwargs", "exc", "match"),
    [
        (
            "embedded_gaussian",
            lambda p: {k: v for k, v in p.items() if k != "w_theta"},
            {},
            ValueError,
            "w_theta",
        ),
        ("embedded_gaussian", lambda p: {**p, "w_phi": p["w_phi"][:1]}, {}, ValueError, "w_phi"),
        ("embedded_gaussian", lambda p: {**p, "w_z": p["w_z"][..., 0, 0]}, {}, ValueError, "w_z"),
        ("embedded_gaussian", lambda p: {**p, "b_z": p["b_z"][:1]}, {}, ValueError, "b_z"),
        ("embedded_gaussian", lambda p: {**p, "w_f": np.ones((1, 4, 1, 1))}, {}, ValueError, "w_f"),
        (
            "gaussian",
            lambda p: {**p, "w_theta": np.ones((2, 4, 1, 1))},
            {"mode": "gaussian"},
            ValueError,
            "w_theta",
        ),
        (
            "concat",
            lambda p: {k: v for k, v in p.items() if k != "w_f"},
            {"mode": "concat"},
            ValueError,
            "w_f",
        ),
        ("dot", lambda p: p, {"mode": "dot", "scale": 0.5}, ValueError, "scale"),
        ("dot", lambda p: p, {"mode": "softmax"}, ValueError, "mode"),
        ("dot", lambda p: p, {"mode": "dot", "subsample": 1}, TypeError, "subsample"),
        (
            "dot",
            lambda p: {**p, "w_g": p["w_g"].astype(np.float32)},
            {"mode": "dot"},
            TypeError,
            "w_g",
        ),
        (
            "dot",
            lambda p: {k: v for k, v in p.items() if k != "w_g"},
            {"mode": "dot"},
            ValueError,
            "w_g",
        ),
    ],
)
def test_bad_params(rng, mode, mutate, kwargs, exc, match):
    x = rng.standard_normal((2, 4, 4, 4))
    p = mutate(example_params(rng, 4, 2, mode))
    with pytest.raises(exc, match=match):
        NL(x, p, **kwargs)


def test_bad_x(rng):
    p = example_params(rng, 4, 2, "dot")
    with pytest.raises(ValueError, match="x"):
        NL(rng.standard_normal((4, 4, 4)), p, mode="dot")
    with pytest.raises(TypeError, match="x"):
        NL(np.ones((1, 4, 4, 4), dtype=np.int32), p, mode="dot")
    with pytest.raises(ValueError, match="subsample"):
        NL(rng.standard_normal((1, 4, 1, 4)), p, mode="dot", subsample=True)
    with pytest.raises(TypeError, match="namespaces"):
        NL(torch.ones((1, 4, 2, 2), dtype=torch.float64), p, mode="dot")

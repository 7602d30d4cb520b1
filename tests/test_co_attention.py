"""Tests of COSNet co-attention, CoDA and CAN cross attention (derivation:
docs/derivations/co_attention.rst)."""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._glue.co_attention import (
    example_can_params,
    example_coattn_params,
    example_coda_params,
)
from arrayattn._gradcheck import numerical_gradient
from support import (
    RTOL,
    assert_close_rel,
    directional_check,
    has_kernel,
    require_kernel,
    to_numpy,
    to_xp,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def softmax(s, axis=-1):
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# -- dense float64 oracles from the spec formulas --------------------------------------------------


def coattn_oracle(a, b, p, second="paper"):
    n, c = a.shape[:2]
    va, vb = a.reshape(n, c, -1), b.reshape(n, c, -1)
    s = np.einsum("nci,cd,ndj->nij", vb, p["w"], va)  # S = V_bᵀ W V_a  (Pb × Pa)
    sr = softmax(np.swapaxes(s, 1, 2), axis=1)  # S^r = softmax(Sᵀ) column-wise  (Pa × Pb)
    sc = softmax(s, axis=1) if second == "paper" else softmax(np.swapaxes(sr, 1, 2), axis=1)
    za, zb = vb @ sc, va @ sr
    wg, bg = p["w_gate"][0, :, 0, 0], p.get("b_gate", np.zeros(1))[0]
    za = za * sig(np.einsum("c,ncp->np", wg, za) + bg)[:, None]
    zb = zb * sig(np.einsum("c,ncp->np", wg, zb) + bg)[:, None]
    return za.reshape(a.shape), zb.reshape(b.shape)


def coda_oracle(a, b, p, centering=False):
    fe = lambda x: x @ p["w_e"].T + p.get("b_e", 0.0)  # noqa: E731
    fn = lambda x: x @ p["w_n"].T + p.get("b_n", 0.0)  # noqa: E731
    alpha, beta = p.get("alpha", [1.0])[0], p.get("beta", [1.0])[0]
    e = alpha * fe(a) @ np.swapaxes(fe(b), -1, -2)
    nn = -beta * np.abs(fn(a)[..., :, None, :] - fn(b)[..., None, :, :]).sum(-1)
    if centering:
        nn = nn - nn.mean(axis=(-2, -1), keepdims=True)
    m = np.tanh(e) * sig(nn)
    return m @ b, np.swapaxes(m, -1, -2) @ a


def can_oracle(fp, fq, prm, tau=0.025):
    n, c = fp.shape[:2]
    P, Q = fp.reshape(n, c, -1), fq.reshape(n, c, -1)
    pn = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    qn = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
    r = np.einsum("nci,ncj->nij", pn, qn)
    w1, w2 = prm["w1"][:, :, 0, 0], prm["w2"][:, :, 0, 0]

    def att(rr):
        g = rr.mean(axis=1)
        w = np.maximum(g @ w1.T + prm.get("b1", 0.0), 0) @ w2.T + prm.get("b2", 0.0)
        return softmax((rr * w[:, None, :]).mean(-1) / tau, axis=-1)

    ap, aq = att(r), att(np.swapaxes(r, 1, 2))
    return (P * (1 + ap[:, None])).reshape(fp.shape), (Q * (1 + aq[:, None])).reshape(fq.shape)


# -- re-implementations of the official code (PyTorch, same weights) -------------------------------


def torch_cosnet(exemplar, query, linear_w, gate_w, version):
    """CoattentionModel.forward of carrierlxk/COSNet deeplab/siamese_model_conf.py, up to the
    concat.

    ``version='a5e929ac'`` overwrites A with its softmax (B is a softmax of probabilities);
    ``'dbae2e8d'`` keeps A1 separate (B from the raw affinities).
    """
    n, c, h, w = query.shape
    exemplar_flat = exemplar.view(-1, c, h * w)
    query_flat = query.view(-1, c, h * w)
    exemplar_t = torch.transpose(exemplar_flat, 1, 2).contiguous()
    exemplar_corr = F.linear(exemplar_t, linear_w)
    A = torch.bmm(exemplar_corr, query_flat)
    if version == "a5e929ac":
        A = F.softmax(A, dim=1)
        A1 = A
    else:
        A1 = F.softmax(A.clone(), dim=1)
    B = F.softmax(torch.transpose(A, 1, 2), dim=1)
    query_att = torch.bmm(exemplar_flat, A1).contiguous()
    exemplar_att = torch.bmm(query_flat, B).contiguous()
    input1_att = exemplar_att.view(-1, c, h, w)
    input2_att = query_att.view(-1, c, h, w)
    input1_att = input1_att * torch.sigmoid(F.conv2d(input1_att, gate_w))
    input2_att = input2_att * torch.sigmoid(F.conv2d(input2_att, gate_w))
    return input1_att, input2_att


class TorchCAN(torch.nn.Module):
    """CAM of blue-blue272/fewshot-CAN torchFewShot/models/cam.py with ConvBlock's BN omitted."""

    def __init__(self, m=36, hidden=6):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(m, hidden, 1)
        self.conv2 = torch.nn.Conv2d(hidden, m, 1, stride=1, padding=0)

    def get_attention(self, a):
        input_a = a
        a = a.mean(3)
        a = a.transpose(1, 3)
        a = F.relu(self.conv1(a))
        a = self.conv2(a)
        a = a.transpose(1, 3)
        a = a.unsqueeze(3)
        a = torch.mean(input_a * a, -1)
        a = F.softmax(a / 0.025, dim=-1) + 1
        return a

    def forward(self, f1, f2):
        b, n1, c, h, w = f1.size()
        n2 = f2.size(1)
        f1 = f1.view(b, n1, c, -1)
        f2 = f2.view(b, n2, c, -1)
        f1_norm = F.normalize(f1, p=2, dim=2, eps=1e-12)
        f2_norm = F.normalize(f2, p=2, dim=2, eps=1e-12)
        f1_norm = f1_norm.transpose(2, 3).unsqueeze(2)
        f2_norm = f2_norm.unsqueeze(1)
        a1 = torch.matmul(f1_norm, f2_norm)
        a2 = a1.transpose(3, 4)
        a1 = self.get_attention(a1)
        a2 = self.get_attention(a2)
        f1 = f1.unsqueeze(2) * a1.unsqueeze(3)
        f1 = f1.view(b, n1, n2, c, h, w)
        f2 = f2.unsqueeze(1) * a2.unsqueeze(3)
        f2 = f2.view(b, n1, n2, c, h, w)
        return f1.transpose(1, 2), f2.transpose(1, 2)


# -- COSNet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["paper", "code"])
@pytest.mark.parametrize("bias", [False, True])
def test_coattn_oracle(rng, backend, second, bias):
    a, b = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((2, 5, 2, 3))  # Pa != Pb
    p = example_coattn_params(rng, 5, bias=bias)
    za, zb = aa.co_attention(a, b, p, second_softmax=second)
    ra, rb = coattn_oracle(a, b, p, second)
    assert_close_rel(za, ra, 1e-12)
    assert_close_rel(zb, rb, 1e-12)


@pytest.mark.parametrize(("version", "second"), [("a5e929ac", "code"), ("dbae2e8d", "paper")])
def test_coattn_vs_official_torch(rng, backend, version, second):
    c = 8
    a, b = rng.standard_normal((2, c, 4, 5)), rng.standard_normal((2, c, 4, 5))
    p = example_coattn_params(rng, c)
    da, db = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    wt, gt = torch.tensor(p["w"], requires_grad=True), torch.tensor(p["w_gate"], requires_grad=True)
    ya, yb = torch_cosnet(at, bt, wt, gt, version)
    (ya * torch.tensor(da) + yb * torch.tensor(db)).sum().backward()
    (za, zb), res = aa.co_attention.fwd(a, b, p, second_softmax=second)
    g = aa.co_attention.bwd(res, (da, db))
    assert_close_rel(za, ya.detach().numpy(), 1e-12)
    assert_close_rel(zb, yb.detach().numpy(), 1e-12)
    assert_close_rel(g.v_a, at.grad.numpy(), 1e-10)
    assert_close_rel(g.v_b, bt.grad.numpy(), 1e-10)
    assert_close_rel(g.params["w"], wt.grad.numpy(), 1e-10)
    assert_close_rel(g.params["w_gate"], gt.grad.numpy(), 1e-10)


def test_coattn_second_softmax_matters(rng):
    a, b = rng.standard_normal((1, 4, 3, 3)), rng.standard_normal((1, 4, 3, 3))
    p = example_coattn_params(rng, 4)
    za_p, zb_p = aa.co_attention(a, b, p)
    za_c, zb_c = aa.co_attention(a, b, p, second_softmax="code")
    np.testing.assert_allclose(zb_p, zb_c, rtol=1e-12)  # the first softmax is the same
    assert not np.allclose(za_p, za_c)


# -- CoDA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centering", [False, True])
@pytest.mark.parametrize(
    ("shape_a", "shape_b"), [((2, 4, 5), (2, 3, 5)), ((3, 1, 2, 6), (3, 1, 7, 6)), ((1, 3), (1, 3))]
)
def test_coda_oracle(rng, backend, shape_a, shape_b, centering):
    a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
    p = example_coda_params(rng, shape_a[-1], 3)
    p["b_n"] = rng.standard_normal(3)
    oa, ob = aa.coda(a, b, p, centering=centering)
    ra, rb = coda_oracle(a, b, p, centering)
    assert_close_rel(oa, ra, 1e-12)
    assert_close_rel(ob, rb, 1e-12)


def test_coda_quasi_attention_range(rng):
    """M ∈ (-1, 1) with both signs, rows not normalised (no softmax): probe M with B = I."""
    d = 5
    a = rng.standard_normal((1, 6, d))
    p = example_coda_params(rng, d, 3)
    m = aa.coda(a, np.eye(d)[None], p)[0]  # A' = M I = M  (La × Lb with Lb = d)
    assert np.all(np.abs(m) < 1)
    assert (m < 0).any()
    assert (m > 0).any()
    assert not np.allclose(m.sum(axis=-1), 1.0)


def _coda_loss(a, b, p, da, db, centering=False):
    oa, ob = aa.coda(a, b, p, centering=centering)
    return float(np.sum(oa * da) + np.sum(ob * db))


@pytest.mark.parametrize("centering", [False, True])
def test_coda_elementwise_gradients(rng, backend, centering):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 2, 4))
    p = example_coda_params(rng, 4, 3)
    da, db = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
    (oa, ob), res = aa.coda.fwd(a, b, p, centering=centering)
    g = aa.coda.bwd(res, (da, db))
    assert_close_rel(
        g.a, numerical_gradient(lambda x: _coda_loss(x, b, p, da, db, centering), a), 1e-7, "a"
    )
    assert_close_rel(
        g.b, numerical_gradient(lambda x: _coda_loss(a, x, p, da, db, centering), b), 1e-7, "b"
    )
    for key in p:
        num = numerical_gradient(
            lambda x: _coda_loss(a, b, {**p, key: x}, da, db, centering), p[key]
        )
        assert_close_rel(g.params[key], num, 1e-7, key)


# -- CAN -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "hidden", "tau"),
    [((3, 8, 6, 6), 6, 0.025), ((2, 4, 2, 3), 2, 0.5), ((1, 3, 1, 1), 1, 0.025)],
)
def test_can_oracle(rng, shape, hidden, tau):
    fp, fq = rng.standard_normal(shape), rng.standard_normal(shape)
    prm = example_can_params(rng, shape[2] * shape[3], hidden)
    op_, oq = aa.cross_attention_fewshot(fp, fq, prm, tau=tau)
    rp, rq = can_oracle(fp, fq, prm, tau)
    assert_close_rel(op_, rp, 1e-12)
    assert_close_rel(oq, rq, 1e-12)


def test_can_vs_official_torch(rng):
    """All (class, query) pairs of the official CAM (b=1, n1=2, n2=3, m=36) vs the op on pairs."""
    torch.manual_seed(0)
    m = TorchCAN().double()
    n1, n2, c = 2, 3, 16
    f1, f2 = rng.standard_normal((1, n1, c, 6, 6)), rng.standard_normal((1, n2, c, 6, 6))
    f1t, f2t = torch.tensor(f1, requires_grad=True), torch.tensor(f2, requires_grad=True)
    o1, o2 = m(f1t, f2t)  # (1, n2, n1, c, h, w)
    d1, d2 = rng.standard_normal(o1.shape), rng.standard_normal(o2.shape)
    (o1 * torch.tensor(d1) + o2 * torch.tensor(d2)).sum().backward()
    prm = {
        "w1": m.conv1.weight.detach().numpy(),
        "b1": m.conv1.bias.detach().numpy(),
        "w2": m.conv2.weight.detach().numpy(),
        "b2": m.conv2.bias.detach().numpy(),
    }
    # pairs: index (j, i) = (query j, class i)
    fp = np.stack([f1[0, i] for j in range(n2) for i in range(n1)])
    fq = np.stack([f2[0, j] for j in range(n2) for i in range(n1)])
    (pp, qq), res = aa.cross_attention_fewshot.fwd(fp, fq, prm)
    g = aa.cross_attention_fewshot.bwd(res, (d1[0].reshape(fp.shape), d2[0].reshape(fq.shape)))
    assert_close_rel(pp, o1.detach().numpy()[0].reshape(fp.shape), 1e-12)
    assert_close_rel(qq, o2.detach().numpy()[0].reshape(fq.shape), 1e-12)
    dp = g.p.reshape(n2, n1, c, 6, 6).sum(axis=0)
    dq = g.q.reshape(n2, n1, c, 6, 6).sum(axis=1)
    assert_close_rel(dp, f1t.grad.numpy()[0], 1e-9)
    assert_close_rel(dq, f2t.grad.numpy()[0], 1e-9)
    for key, t in (
        ("w1", m.conv1.weight),
        ("b1", m.conv1.bias),
        ("w2", m.conv2.weight),
        ("b2", m.conv2.bias),
    ):
        assert_close_rel(g.params[key], t.grad.numpy(), 1e-9, key)


def test_can_peaked_softmax_float32(rng):
    """τ = 0.025 with float32 inputs: finite, within float32 rounding of the float64 oracle."""
    fp, fq = rng.standard_normal((4, 32, 6, 6)), rng.standard_normal((4, 32, 6, 6))
    prm = example_can_params(rng, 36, 6)
    prm["w2"] = prm["w2"] * 20  # large kernel: logits / τ of order 1e3
    f32 = {k: v.astype(np.float32) for k, v in prm.items()}
    (pp, qq), res = aa.cross_attention_fewshot.fwd(
        fp.astype(np.float32), fq.astype(np.float32), f32
    )
    assert pp.dtype == np.float32
    assert np.all(np.isfinite(pp))
    assert np.all(np.isfinite(qq))
    rp, _ = can_oracle(
        fp.astype(np.float32).astype(np.float64),
        fq.astype(np.float32).astype(np.float64),
        {k: v.astype(np.float64) for k, v in f32.items()},
    )
    # the peaked softmax amplifies float32 rounding of its logits by |logits|: compare with that
    naive, _ = can_oracle(*(x.astype(np.float32) for x in (fp, fq)), f32)
    assert np.max(np.abs(pp - rp)) <= 2 * np.max(np.abs(naive - rp)) + 1e-5 * np.max(np.abs(rp))
    g = aa.cross_attention_fewshot.bwd(res, (np.ones_like(pp), None))
    assert np.all(np.isfinite(g.p))
    assert g.params["w1"].dtype == np.float32


def test_can_zero_feature(rng):
    """A position with an all-zero feature: F.normalize's eps keeps everything finite."""
    fp, fq = rng.standard_normal((1, 4, 2, 2)), rng.standard_normal((1, 4, 2, 2))
    fp[0, :, 0, 0] = 0.0
    prm = example_can_params(rng, 4, 2)
    (pp, qq), res = aa.cross_attention_fewshot.fwd(fp, fq, prm, tau=0.5)
    assert_close_rel(pp, can_oracle(fp, fq, prm, 0.5)[0], 1e-12)
    g = aa.cross_attention_fewshot.bwd(res, (np.ones_like(pp), np.ones_like(qq)))
    assert np.all(np.isfinite(g.p))


def test_can_elementwise_gradients(rng):
    fp, fq = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((2, 3, 2, 2))
    prm = example_can_params(rng, 4, 2)
    dp, dq = rng.standard_normal(fp.shape), rng.standard_normal(fq.shape)
    kw = {"tau": 0.3}

    def loss(a, b, pr):
        x, y = aa.cross_attention_fewshot(a, b, pr, **kw)
        return float(np.sum(x * dp) + np.sum(y * dq))

    _, res = aa.cross_attention_fewshot.fwd(fp, fq, prm, **kw)
    g = aa.cross_attention_fewshot.bwd(res, (dp, dq))
    assert_close_rel(g.p, numerical_gradient(lambda x: loss(x, fq, prm), fp), 1e-7, "p")
    assert_close_rel(g.q, numerical_gradient(lambda x: loss(fp, x, prm), fq), 1e-7, "q")
    for key in prm:
        assert_close_rel(
            g.params[key],
            numerical_gradient(lambda x: loss(fp, fq, {**prm, key: x}), prm[key]),
            1e-7,
            key,
        )


# -- shared: finite differences, backends, namespaces, inputs --------------------------------------


def _calls(rng, backend="array_api"):
    """Small calls of every op; under another backend only those that run there (co_attention is
    composite: its SDPA cores run on numba; CAN has no numba kernel)."""
    calls = _all_calls(rng)
    return [
        c for c in calls if backend == "array_api" or c[0].composite or has_kernel(c[0], backend)
    ]


def _all_calls(rng):
    a, b = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((2, 4, 2, 4))
    s_a, s_b = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 3, 5))
    fp, fq = rng.standard_normal((2, 5, 2, 3)), rng.standard_normal((2, 5, 2, 3))
    return [
        (aa.co_attention, (a, b, example_coattn_params(rng, 4, bias=True)), {}),
        (
            aa.co_attention,
            (a, b, example_coattn_params(rng, 4, bias=True)),
            {"second_softmax": "code"},
        ),
        (aa.coda, (s_a, s_b, example_coda_params(rng, 5, 3)), {}),
        (aa.coda, (s_a, s_b, example_coda_params(rng, 5, 3)), {"centering": True}),
        (aa.cross_attention_fewshot, (fp, fq, example_can_params(rng, 6, 2)), {"tau": 0.2}),
    ]


def test_directional(rng, backend):
    for op_, args, kwargs in _calls(rng, backend):
        directional_check(op_, args, kwargs, rng)


def test_coattn_elementwise_gradients(rng):
    a, b = rng.standard_normal((1, 3, 2, 2)), rng.standard_normal((1, 3, 1, 3))
    for second in ("paper", "code"):
        p = example_coattn_params(rng, 3, bias=True)
        da, db = rng.standard_normal(a.shape), rng.standard_normal(b.shape)

        def loss(x, y, pr):
            za, zb = aa.co_attention(x, y, pr, second_softmax=second)
            return float(np.sum(za * da) + np.sum(zb * db))

        _, res = aa.co_attention.fwd(a, b, p, second_softmax=second)
        g = aa.co_attention.bwd(res, (da, db))
        assert_close_rel(g.v_a, numerical_gradient(lambda x: loss(x, b, p), a), 1e-7, "v_a")
        assert_close_rel(g.v_b, numerical_gradient(lambda x: loss(a, x, p), b), 1e-7, "v_b")
        for key in p:
            assert_close_rel(
                g.params[key],
                numerical_gradient(lambda x: loss(a, b, {**p, key: x}), p[key]),
                1e-7,
                key,
            )


def test_coattn_paper_paths_agree(rng, backend, monkeypatch):
    """'paper' with the dense affinity map and through two attention cores (forced by the pair
    limit): the same outputs and gradients."""
    from arrayattn._reference import co_attention as ref

    a, b = rng.standard_normal((2, 6, 3, 5)), rng.standard_normal((2, 6, 4, 2))
    p = example_coattn_params(rng, 6, bias=True)
    cts = (rng.standard_normal(a.shape), rng.standard_normal(b.shape))
    out = {}
    for limit in (ref.DENSE_MAX_PAIRS, 0):
        monkeypatch.setattr(ref, "DENSE_MAX_PAIRS", limit)
        (za, zb), res = aa.co_attention.fwd(a, b, p)
        assert (limit == 0) == ("attn_a" in dict(res.nested))
        g = aa.co_attention.bwd(res, cts)
        out[limit] = (za, zb, g.v_a, g.v_b, *(g.params[k] for k in sorted(p)))
    for x, y in zip(*out.values(), strict=True):
        assert_close_rel(y, x, 1e-12)


def test_coattn_backends_agree(rng, monkeypatch):
    """Through attention cores (pair limit 0), they run on the active backend."""
    from arrayattn._reference import co_attention as ref

    if not has_kernel(aa.scaled_dot_product_attention, "numba"):
        pytest.skip("no numba SDPA kernel here")
    monkeypatch.setattr(ref, "DENSE_MAX_PAIRS", 0)
    a, b = rng.standard_normal((2, 8, 5, 5)), rng.standard_normal((2, 8, 4, 6))
    p = example_coattn_params(rng, 8, bias=True)
    cts = (rng.standard_normal(a.shape), rng.standard_normal(b.shape))
    out = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            (za, zb), res = aa.co_attention.fwd(a, b, p)
            g = aa.co_attention.bwd(res, cts)
        assert dict(res.nested)["attn_a"].backend == name
        out[name] = (za, zb, g.v_a, g.v_b, g.params["w"], g.params["w_gate"])
    for x, y in zip(out["array_api"], out["numba"], strict=True):
        assert_close_rel(y, x, 1e-10)


CODA_PATH_CASES = [
    # (lead, La, Lb, d, k, k_n): one item (the reference with the fused L1 loops) and several
    # (the per-item kernel); widths with a vectorized body and a remainder.
    ((), 6, 5, 19, 37, 21),
    ((1,), 6, 5, 19, 37, 21),
    ((3,), 6, 5, 19, 37, 21),
    ((2, 2), 1, 7, 9, 3, 40),
]


@pytest.mark.parametrize(("lead", "la", "lb", "d", "k", "kn"), CODA_PATH_CASES)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("centering", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_coda_numba_paths_equal_reference(
    lead, la, lb, d, k, kn, parallel, centering, dtype, rng, monkeypatch
):
    """Both numba paths (one item; several items, each in one fused pass) and their serial and
    parallel twins equal the array-API reference, with every optional parameter present."""
    kernels = pytest.importorskip("arrayattn.backends.numba.co_attention")
    require_kernel(aa.coda, "numba")
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)
    a, b = rng.standard_normal(lead + (la, d)), rng.standard_normal(lead + (lb, d))
    p = example_coda_params(rng, d, k)
    p["w_n"], p["b_n"] = rng.standard_normal((kn, d)) / d**0.5, rng.standard_normal(kn)
    p["beta"] = p["beta"] / kn  # keeps σ(N) away from 0 so that every term counts
    a, b, p = a.astype(dtype), b.astype(dtype), {key: v.astype(dtype) for key, v in p.items()}
    cts = (rng.standard_normal(a.shape).astype(dtype), rng.standard_normal(b.shape).astype(dtype))
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            outs, res = aa.coda.fwd(a, b, p, centering=centering)
            assert res.backend == name
            results[name] = (*outs, aa.coda.bwd(res, cts))
    ref, got = results["array_api"], results["numba"]
    tol = RTOL[dtype]
    assert_close_rel(got[0], ref[0], tol, "a_out")
    assert_close_rel(got[1], ref[1], tol, "b_out")
    assert_close_rel(got[2].a, ref[2].a, 20 * tol, "a")
    assert_close_rel(got[2].b, ref[2].b, 20 * tol, "b")
    assert set(got[2].params) == set(p)
    for key in p:
        assert got[2].params[key].dtype == dtype
        # b_n cancels in F_N(a_i) − F_N(b_j): its gradient is 0 up to rounding on both sides.
        floor = float(np.max(np.abs(ref[2].params["w_n"]))) if key == "b_n" else 0.0
        assert_close_rel(got[2].params[key], ref[2].params[key], 20 * tol, key, floor=floor)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_coda_ties_have_zero_subgradient(rng, backend, lead):
    """With b = a every F_N(a_i) − F_N(b_i) is exactly 0: those terms contribute nothing to the
    gradients (subgradient 0), on every backend; checked against the float64 oracle's gradient
    taken by finite differences along a direction that keeps the ties."""
    a = rng.standard_normal(lead + (4, 6))
    p = example_coda_params(rng, 6, 5)
    cts = (rng.standard_normal(a.shape), rng.standard_normal(a.shape))
    (oa, ob), res = aa.coda.fwd(a, a.copy(), p)
    g = aa.coda.bwd(res, cts)
    ra, rb = coda_oracle(a, a, p)
    assert_close_rel(oa, ra, 1e-12)
    assert_close_rel(ob, rb, 1e-12)
    # The diagonal distances are 0 whatever a is, so the loss is smooth along a direction
    # applied to both arguments at once; its derivative must be the sum of the two gradients.
    u = rng.standard_normal(a.shape)

    def loss(t):
        return float(
            sum(
                np.sum(o * c)
                for o, c in zip(coda_oracle(a + t * u, a + t * u, p), cts, strict=True)
            )
        )  # noqa: E731

    h = 1e-6
    numeric = (loss(h) - loss(-h)) / (2 * h)
    assert abs(float(np.sum((g.a + g.b) * u)) - numeric) <= 1e-6 * max(1.0, abs(numeric))
    # That derivative cannot see the value taken at a tie (it cancels between a and b); the
    # reference's xp.sign(0) = 0 is the convention, and each kernel must follow it.
    with aa.use_backend("array_api"):
        want = aa.coda.bwd(aa.coda.fwd(a, a.copy(), p)[1], cts)
    assert_close_rel(g.a, want.a, 1e-12, "a")
    assert_close_rel(g.b, want.b, 1e-12, "b")
    for key in p:
        assert_close_rel(g.params[key], want.params[key], 1e-12, key)


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "d"),
    [((2, 0), (2, 3), 5), ((0, 4), (0, 3), 5), ((2, 4), (2, 0), 5), ((4,), (3,), 0)],
)
@pytest.mark.parametrize("centering", [False, True])
def test_coda_empty(rng, backend, shape_a, shape_b, d, centering):
    """Empty lengths, batch or width: empty outputs, zero gradients, no warning, no NaN."""
    a, b = rng.standard_normal(shape_a + (d,)), rng.standard_normal(shape_b + (d,))
    p = example_coda_params(rng, d, 3) if d else {"w_e": np.ones((3, 0)), "w_n": np.ones((2, 0))}
    (oa, ob), res = aa.coda.fwd(a, b, p, centering=centering)
    assert oa.shape == a.shape
    assert ob.shape == b.shape
    g = aa.coda.bwd(res, (np.ones_like(oa), np.ones_like(ob)))
    assert g.a.shape == a.shape
    assert g.b.shape == b.shape
    for key, v in g.params.items():
        assert v.shape == p[key].shape, key
        assert not np.any(v), key


def test_reference_on_namespaces(xp, rng):
    for op_, args, kwargs in _calls(rng):
        cts = tuple(rng.standard_normal(o.shape) for o in op_(*args, **kwargs))
        with aa.use_backend("array_api"):
            outs, res = op_.fwd(*(to_xp(xp, a) for a in args), **kwargs)
            g = op_.bwd(res, tuple(to_xp(xp, c) for c in cts))
            outs64, res64 = op_.fwd(*args, **kwargs)
            g64 = op_.bwd(res64, cts)
        for o, o64 in zip(outs, outs64, strict=True):
            assert_close_rel(to_numpy(o), o64, 1e-12)
        for name in op_.differentiable:
            got, want = getattr(g, name), getattr(g64, name)
            if isinstance(want, dict):
                for k in want:
                    assert_close_rel(to_numpy(got[k]), want[k], 1e-10, f"{name}[{k}]")
            else:
                assert_close_rel(to_numpy(got), want, 1e-10, name)


def test_float32(rng, backend):
    for op_, args, kwargs in _calls(rng, backend):
        args32 = tuple(
            {k: v.astype(np.float32) for k, v in a.items()}
            if isinstance(a, dict)
            else a.astype(np.float32)
            for a in args
        )
        args64 = tuple(
            {k: v.astype(np.float64) for k, v in a.items()}
            if isinstance(a, dict)
            else a.astype(np.float64)
            for a in args32
        )
        outs, res = op_.fwd(*args32, **kwargs)
        for o, r in zip(outs, op_(*args64, **kwargs), strict=True):
            assert o.dtype == np.float32
            assert_close_rel(o, r, 5e-5)
        g = op_.bwd(res, tuple(np.ones_like(o) for o in outs))
        assert all(v.dtype == np.float32 for v in g.params.values())


def test_read_only_inputs(rng, backend):
    for op_, args, kwargs in _calls(rng, backend):
        arrays = [a for x in args for a in (x.values() if isinstance(x, dict) else [x])]
        for a in arrays:
            a.setflags(write=False)
        before = [a.copy() for a in arrays]
        outs, res = op_.fwd(*args, **kwargs)
        g = op_.bwd(res, tuple(np.ones_like(o) for o in outs))
        for a, b in zip(arrays, before, strict=True):
            np.testing.assert_array_equal(a, b)
        for o in outs:
            assert not any(np.shares_memory(o, a) for a in arrays)
        assert not np.shares_memory(getattr(g, op_.differentiable[0]), args[0])


def test_bad_inputs(rng):
    a, b = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((2, 4, 2, 4))
    p = example_coattn_params(rng, 4)
    with pytest.raises(ValueError, match="second_softmax"):
        aa.co_attention(a, b, p, second_softmax="both")
    with pytest.raises(ValueError, match="v_b"):
        aa.co_attention(a, b[:, :3], p)
    with pytest.raises(ValueError, match="w_gate"):
        aa.co_attention(a, b, {**p, "w_gate": p["w_gate"][0, :, 0, 0]})
    with pytest.raises(ValueError, match="'w'"):
        aa.co_attention(a, b, {"w_gate": p["w_gate"]})
    with pytest.raises(TypeError, match="v_a"):
        aa.co_attention(a.astype(np.float32), b, p)
    s_a, s_b = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 3, 5))
    q = example_coda_params(rng, 5, 3)
    with pytest.raises(ValueError, match="b"):
        aa.coda(s_a, s_b[..., :4], q)
    with pytest.raises(ValueError, match="w_n"):
        aa.coda(s_a, s_b, {k: v for k, v in q.items() if k != "w_n"})
    with pytest.raises(ValueError, match="alpha"):
        aa.coda(s_a, s_b, {**q, "alpha": np.ones(2)})
    with pytest.raises(ValueError, match="gamma"):
        aa.coda(s_a, s_b, {**q, "gamma": np.ones(1)})
    with pytest.raises(TypeError, match="centering"):
        aa.coda(s_a, s_b, q, centering="yes")
    fp = rng.standard_normal((2, 5, 2, 3))
    r = example_can_params(rng, 6, 2)
    with pytest.raises(ValueError, match="q"):
        aa.cross_attention_fewshot(fp, fp[:, :, :1], r)
    with pytest.raises(ValueError, match="w1"):
        aa.cross_attention_fewshot(fp, fp, {**r, "w1": np.ones((2, 5, 1, 1))})
    with pytest.raises(ValueError, match="tau"):
        aa.cross_attention_fewshot(fp, fp, r, tau=0.0)
    with pytest.raises(TypeError, match="tau"):
        aa.cross_attention_fewshot(fp, fp, r, tau=None)
    with pytest.raises(TypeError, match="namespaces"):
        aa.cross_attention_fewshot(torch.tensor(fp), fp, r)

"""criss_cross_attention and criss_cross_block (CCNet (derivation:
docs/derivations/criss_cross.rst)).

The oracle flattens the map to HW positions and runs dense attention with the explicit keep-mask
"same row or same column" (the self position once), so it shares nothing with the row/column
decomposition under test. The block is compared with an independent PyTorch re-implementation of
CCNet's ``CrissCrossAttention`` module (conv 1×1, the pure-PyTorch core with a -inf diagonal,
gamma, residual), gradients by torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import RTOL, assert_close_rel, require_kernel, sdpa_oracle, sdpa_oracle_grads, to_xp

CCA = aa.criss_cross_attention
CCB = aa.criss_cross_block


def cross_keep(h, w):
    """(HW, HW) keep-mask: same row or same column (the diagonal once, by construction)."""
    ys, xs = np.divmod(np.arange(h * w), w)
    return (ys[:, None] == ys[None, :]) | (xs[:, None] == xs[None, :])


def oracle(q, k, v, do=None, scale=1.0):
    *lead, h, w, d = q.shape
    flat = lambda a: np.asarray(a, np.float64).reshape(*lead, h * w, a.shape[-1])  # noqa: E731
    keep = cross_keep(h, w)
    out, _ = sdpa_oracle(flat(q), flat(k), flat(v), mask=keep, scale=scale)
    out = out.reshape(*lead, h, w, -1)
    if do is None:
        return out
    dq, dk, dv, _ = sdpa_oracle_grads(flat(q), flat(k), flat(v), flat(do), mask=keep, scale=scale)
    return out, dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


SHAPES = [(2, 4, 5, 3, 6), (1, 1, 5, 3, 2), (2, 4, 1, 3, 2), (1, 1, 1, 2, 3), (1, 7, 3, 1, 4)]


def _inputs(rng, n, h, w, dk, dv, dtype=np.float64, lead=()):
    q = rng.standard_normal((*lead, n, h, w, dk)).astype(dtype)
    k = rng.standard_normal((*lead, n, h, w, dk)).astype(dtype)
    v = rng.standard_normal((*lead, n, h, w, dv)).astype(dtype)
    do = rng.standard_normal((*lead, n, h, w, dv)).astype(dtype)
    return q, k, v, do


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_oracle_fwd_bwd(backend, rng, shape):
    require_kernel(CCA, backend)
    q, k, v, do = _inputs(rng, *shape)
    out, res = CCA.fwd(q, k, v, scale=0.7)
    assert res.backend == backend
    g = CCA.bwd(res, do)
    ref = oracle(q, k, v, do, scale=0.7)
    for got, want, what in zip((out, g.q, g.k, g.v), ref, ("out", "dq", "dk", "dv"), strict=True):
        assert_close_rel(got, want, RTOL[np.float64], what)


def test_leading_dims(backend, rng):
    require_kernel(CCA, backend)
    q, k, v, do = _inputs(rng, 2, 3, 4, 2, 3, lead=(2,))
    out, res = CCA.fwd(q, k, v)
    g = CCA.bwd(res, do)
    for got, want in zip((out, *g), oracle(q, k, v, do), strict=True):
        assert_close_rel(got, want, RTOL[np.float64])


def test_reference_namespaces(xp, rng):
    q, k, v, do = _inputs(rng, 2, 3, 4, 2, 3)
    with aa.use_backend("array_api"):
        out, res = CCA.fwd(*(to_xp(xp, a) for a in (q, k, v)), scale=1.3)
        g = CCA.bwd(res, to_xp(xp, do))
    for got, want in zip((out, *g), oracle(q, k, v, do, scale=1.3), strict=True):
        assert_close_rel(got, want, RTOL[np.float64])


def test_finite_differences(backend, rng):
    require_kernel(CCA, backend)
    q, k, v, do = _inputs(rng, 1, 3, 4, 2, 2)
    _, res = CCA.fwd(q, k, v, scale=0.9)
    g = CCA.bwd(res, do)
    args = {"q": q, "k": k, "v": v}
    for name in args:

        def f(x, name=name):
            return float(np.sum(CCA(**{**args, name: x}, scale=0.9) * do))

        np.testing.assert_allclose(
            getattr(g, name), numerical_gradient(f, args[name]), rtol=1e-6, atol=1e-8
        )


def test_float32_backends_agree(rng):
    require_kernel(CCA, "numba")
    q, k, v, do = _inputs(rng, 2, 6, 5, 4, 8, dtype=np.float32)
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = CCA.fwd(q, k, v)
            results[name] = (out, *CCA.bwd(res, do))
    ref = oracle(q, k, v, do)
    for a, b, want in zip(results["array_api"], results["numba"], ref, strict=True):
        assert a.dtype == np.float32
        assert b.dtype == np.float32
        assert_close_rel(a, want, RTOL[np.float32])
        assert_close_rel(b, want, RTOL[np.float32])


def test_numba_deterministic(rng):
    require_kernel(CCA, "numba")
    q, k, v, do = _inputs(rng, 2, 5, 6, 3, 4, dtype=np.float32)
    with aa.use_backend("numba"):
        runs = []
        for _ in range(2):
            out, res = CCA.fwd(q, k, v)
            runs.append((out, *CCA.bwd(res, do)))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_huge_logits(backend, rng):
    require_kernel(CCA, backend)
    q, k, v, do = _inputs(rng, 1, 4, 4, 3, 2)
    out, res = CCA.fwd(q, k, v, scale=300.0)
    g = CCA.bwd(res, do)
    assert all(np.isfinite(a).all() for a in (out, *g))
    assert_close_rel(out, oracle(q, k, v, scale=300.0), 1e-9)


def test_low_precision_reference(rng):
    q, k, v, _ = _inputs(rng, 1, 4, 5, 3, 2, dtype=np.float16)
    with aa.use_backend("array_api"):
        out = CCA(q, k, v)
    assert out.dtype == np.float16
    ref = oracle(q, k, v)
    # FlashAttention's criterion against a naive float16 computation of the same dense oracle
    flat = lambda a: a.reshape(1, 20, a.shape[-1])  # noqa: E731
    naive, _ = sdpa_oracle(
        flat(q), flat(k), flat(v), mask=cross_keep(4, 5), scale=1.0, dtype=np.float16
    )
    naive_err = np.max(np.abs(naive.reshape(ref.shape).astype(np.float64) - ref))
    assert np.max(np.abs(out.astype(np.float64) - ref)) <= 2 * naive_err + 1e-3


def test_read_only_inputs(backend, rng):
    require_kernel(CCA, backend)
    q, k, v, do = _inputs(rng, 1, 3, 3, 2, 2)
    copies = [a.copy() for a in (q, k, v, do)]
    for a in (q, k, v, do):
        a.flags.writeable = False
    out, res = CCA.fwd(q, k, v)
    CCA.bwd(res, do)
    for a, c in zip((q, k, v, do), copies, strict=True):
        np.testing.assert_array_equal(a, c)
    assert not np.shares_memory(out, v)


def test_bad_inputs(rng):
    q, k, v, _ = _inputs(rng, 1, 3, 4, 2, 2)
    with pytest.raises(ValueError, match="k"):
        CCA(q, k[:, :2], v)
    with pytest.raises(ValueError, match="v"):
        CCA(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="q"):
        CCA(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(TypeError, match="k"):
        CCA(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="q"):
        CCA(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="scale"):
        CCA(q, k, v, scale="1")
    with pytest.raises(ValueError, match="scale"):
        CCA(q, k, v, scale=float("nan"))


# -- the block ----------------------------------------------------------------------------------


def _block_params(rng, c, cq, bias=True):
    p = {
        "w_q": rng.standard_normal((cq, c, 1, 1)) / 2,
        "w_k": rng.standard_normal((cq, c, 1, 1)) / 2,
        "w_v": rng.standard_normal((c, c, 1, 1)) / 2,
        "gamma": np.array([0.6]),
    }
    if bias:
        p.update(
            b_q=rng.standard_normal(cq) / 2,
            b_k=rng.standard_normal(cq) / 2,
            b_v=rng.standard_normal(c) / 2,
        )
    return p


def _torch_block(x, params, recurrence):
    """CCNet's module (pure-PyTorch core), looped with shared parameters; autograd gradients."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from arrayattn._bench.cases_criss_cross import ccnet_torch_attention

    t = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    h = xt
    for _ in range(recurrence):
        q = F.conv2d(h, t["w_q"], t.get("b_q"))
        k = F.conv2d(h, t["w_k"], t.get("b_k"))
        v = F.conv2d(h, t["w_v"], t.get("b_v"))
        h = t["gamma"] * ccnet_torch_attention(q, k, v) + h
    return h, xt, t


@pytest.mark.parametrize(("recurrence", "bias"), [(1, True), (2, True), (2, False), (3, True)])
def test_block_vs_torch(backend, rng, recurrence, bias):
    x = rng.standard_normal((2, 8, 3, 5))
    params = _block_params(rng, 8, 2, bias)
    dy = rng.standard_normal(x.shape)
    y, res = CCB.fwd(x, params, recurrence=recurrence)
    g = CCB.bwd(res, dy)
    yt, xt, t = _torch_block(x, params, recurrence)
    yt.backward(__import__("torch").from_numpy(dy))
    assert_close_rel(y, yt.detach().numpy(), 1e-12, "y")
    assert_close_rel(g.x, xt.grad.numpy(), 1e-10, "dx")
    assert sorted(g.params) == sorted(params)
    for key in params:
        want = t[key].grad.numpy()
        if key == "b_k":  # shifts every logit of a pixel equally: the gradient is exactly 0
            assert np.max(np.abs(g.params[key])) < 1e-10
            assert np.max(np.abs(want)) < 1e-10
            continue
        assert_close_rel(g.params[key], want, 1e-10, key)


def test_block_finite_differences(rng):
    x = rng.standard_normal((1, 4, 3, 3))
    params = {k: v for k, v in _block_params(rng, 4, 2).items() if k != "b_k"}
    errors = directional_errors(CCB, (x, params), {"recurrence": 2}, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_block_gamma_zero_is_identity(rng):
    x = rng.standard_normal((1, 4, 3, 3))
    params = {**_block_params(rng, 4, 2), "gamma": np.zeros(1)}
    np.testing.assert_array_equal(CCB(x, params), x)


def test_block_reference_namespaces(xp, rng):
    x = rng.standard_normal((1, 4, 2, 3))
    params = _block_params(rng, 4, 1)
    dy = rng.standard_normal(x.shape)
    y0, res0 = CCB.fwd(x, params)
    g0 = CCB.bwd(res0, dy)
    with aa.use_backend("array_api"):
        y, res = CCB.fwd(to_xp(xp, x), to_xp(xp, params))
        g = CCB.bwd(res, to_xp(xp, dy))
    assert_close_rel(y, y0, 1e-12)
    assert_close_rel(g.x, g0.x, 1e-12)
    for key in ("w_q", "w_v", "gamma"):
        assert_close_rel(g.params[key], g0.params[key], 1e-10, key)


def test_block_bad_inputs(rng):
    x = rng.standard_normal((1, 4, 3, 3))
    params = _block_params(rng, 4, 2)
    with pytest.raises(ValueError, match="gamma"):
        CCB(x, {k: v for k, v in params.items() if k != "gamma"})
    with pytest.raises(ValueError, match="w_v"):
        CCB(x, {**params, "w_v": np.zeros((4, 4, 3, 3))})
    with pytest.raises(ValueError, match="b_q"):
        CCB(x, {**params, "b_q": np.zeros(3)})
    with pytest.raises(ValueError, match="bogus"):
        CCB(x, {**params, "bogus": np.zeros(1)})
    with pytest.raises(ValueError, match="x"):
        CCB(x[0], params)
    with pytest.raises(ValueError, match="recurrence"):
        CCB(x, params, recurrence=0)
    with pytest.raises(TypeError, match="recurrence"):
        CCB(x, params, recurrence=1.5)
    with pytest.raises(TypeError, match="params"):
        CCB(x, [1, 2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("use_blas", [False, True], ids=["loops", "gemm"])
@pytest.mark.parametrize(
    "shape",
    [(2, 6, 5, 3, 7), (1, 3, 9, 2, 4), (1, 1, 4, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_numba_paths_match_array_api(rng, monkeypatch, dtype, use_blas, shape):
    """Both numba code paths (strided BLAS GEMMs, plain loops) == the array_api reference."""
    require_kernel(CCA, "numba")
    from arrayattn.backends.numba import criss_cross as kernels

    if use_blas and not kernels.HAS_BLAS:
        pytest.skip("no CBLAS: the GEMM path is off")
    monkeypatch.setattr(kernels, "USE_BLAS", use_blas)
    q, k, v, do = _inputs(rng, *shape, dtype=dtype, lead=(2,))
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = CCA.fwd(q, k, v, scale=0.6)
            assert res.backend == name
            results[name] = (out, *CCA.bwd(res, do))
    ref = oracle(q, k, v, do, scale=0.6)
    names = ("out", "dq", "dk", "dv")
    for a, b, want, what in zip(results["array_api"], results["numba"], ref, names, strict=True):
        assert b.dtype == dtype, what
        assert b.shape == want.shape, what
        assert_close_rel(b, a, RTOL[dtype], what)
        assert_close_rel(b, want, RTOL[dtype], what)


@pytest.mark.parametrize(("dk", "dv"), [(0, 3), (2, 0)])
def test_empty_feature_axes(backend, dk, dv):
    """dk = 0 (all logits 0: uniform weights) or dv = 0 (empty output) must not crash."""
    require_kernel(aa.criss_cross_attention, backend)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 4, dk)), rng.standard_normal((2, 3, 4, dk))
    v = rng.standard_normal((2, 3, 4, dv))
    out, res = aa.criss_cross_attention.fwd(q, k, v)
    g = aa.criss_cross_attention.bwd(res, np.ones_like(out))
    assert out.shape == (2, 3, 4, dv)
    assert g.q.shape == q.shape
    assert g.v.shape == v.shape
    if dk == 0:  # uniform weights over the H + W - 1 keys of each pixel's cross
        keys = np.zeros((2, 3, 4, 3 + 4 - 1))
        expected = np.stack(
            [
                np.stack(
                    [
                        (v[:, y, :, :].sum(1) + v[:, :, x, :].sum(1) - v[:, y, x, :])
                        / keys.shape[-1]
                        for x in range(4)
                    ],
                    axis=1,
                )
                for y in range(3)
            ],
            axis=1,
        )
        np.testing.assert_allclose(out, expected, rtol=1e-12)

"""numba_cuda criss_cross_attention under the CUDA simulator == the array-API reference."""

from __future__ import annotations

import numpy as np
import pytest

from arrayattn._reference.criss_cross import criss_cross_backward as ref_bwd
from arrayattn._reference.criss_cross import criss_cross_forward as ref_fwd

nc = pytest.importorskip("arrayattn.backends.numba_cuda.criss_cross")

TOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.float64, (1, 3, 4)),
        (np.float32, (2, 3, 2)),
        (np.float64, (1, 1, 3)),
        (np.float64, (1, 3, 1)),
    ],
)
def test_matches_reference(rng, dtype, shape):
    q = rng.standard_normal(shape + (3,)).astype(dtype)
    k = rng.standard_normal(shape + (3,)).astype(dtype)
    v = rng.standard_normal(shape + (2,)).astype(dtype)
    out, lse = nc.criss_cross_forward(q, k, v, scale=0.8)
    rout, rlse = ref_fwd(np, q, k, v, scale=0.8)
    tol = TOL[dtype]
    np.testing.assert_allclose(out, rout, rtol=0, atol=tol * 4)
    np.testing.assert_allclose(lse, rlse, rtol=0, atol=tol * 4)
    do = rng.standard_normal(out.shape).astype(dtype)
    got = nc.criss_cross_backward(q, k, v, out, lse, do, scale=0.8)
    want = ref_bwd(np, q, k, v, rout, rlse, do, scale=0.8)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * 4 * max(1, np.abs(w).max()))


def test_kernel_interface_and_determinism(rng):
    import arrayattn as aa

    ref = aa.criss_cross_attention.reference
    kern = aa.criss_cross_attention.adapt(nc.KERNELS["criss_cross_attention"])
    q, k, v = (rng.standard_normal((1, 2, 3, 2)) for _ in range(3))
    call = aa.criss_cross_attention._prepare(q, k, v, scale=0.5)
    assert kern.not_supported_reasons(call) == []
    outs, saved = kern.fwd(np, dict(call.arrays), call.options, True)
    routs, rsaved = ref.fwd(np, dict(call.arrays), call.options, True)
    np.testing.assert_allclose(outs[0], routs[0], rtol=0, atol=1e-12)
    assert set(saved) == set(rsaved)
    ct = (rng.standard_normal(outs[0].shape),)
    g1 = kern.bwd(np, saved, call.options, ct)
    g2 = kern.bwd(np, saved, call.options, ct)
    rg = ref.bwd(np, rsaved, call.options, ct)
    for key in rg:
        np.testing.assert_allclose(g1[key], rg[key], rtol=0, atol=1e-12)
        assert np.array_equal(g1[key], g2[key])

"""numba_cuda neighbourhood / halo attention under the CUDA simulator == the array-API reference.

Tiny shapes (the simulator runs every thread as a Python thread): 1-2 batch·heads, 5×6 images,
K = 3 (and 2), d <= 4.
"""

from __future__ import annotations

import numpy as np
import pytest

from arrayattn._reference.neighborhood import (
    halo_axis_windows,
    na_axis_windows,
    window_attention_backward,
    window_attention_forward,
)

nc = pytest.importorskip("arrayattn.backends.numba_cuda.neighborhood")

TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype] * scale)


def _run(
    rng,
    dtype,
    wy,
    wx,
    boundary,
    *,
    batch=(1,),
    d=3,
    dv=2,
    bias_shape=None,
    rh_shape=None,
    rw_shape=None,
    scale=0.7,
    edit=None,
):
    h, w = wy.idx.shape[1], wx.idx.shape[1]
    q = rng.standard_normal(batch + (h, w, d)).astype(dtype)
    k = rng.standard_normal(batch + (h, w, d)).astype(dtype)
    v = rng.standard_normal(batch + (h, w, dv)).astype(dtype)
    opt = {}
    for name, shape in (("rel_bias", bias_shape), ("r_h", rh_shape), ("r_w", rw_shape)):
        opt[name] = None if shape is None else (rng.standard_normal(shape) / 2).astype(dtype)
    if edit is not None:
        edit(opt)
    kw = dict(boundary=boundary, scale=scale, **opt)
    out, lse = nc.window_attention_forward(q, k, v, wy, wx, **kw)
    rout, rlse = window_attention_forward(np, q, k, v, wy, wx, **kw)
    assert out.shape == rout.shape
    assert out.dtype == rout.dtype
    _close(out, rout, dtype)
    assert np.array_equal(np.isinf(lse), np.isinf(rlse))
    _close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(rlse), 0, rlse), dtype)
    do = rng.standard_normal(out.shape).astype(dtype)
    got = nc.window_attention_backward(q, k, v, out, lse, do, wy, wx, **kw)
    want = window_attention_backward(np, q, k, v, rout, rlse, do, wy, wx, **kw)
    for name, g, r in zip(("dq", "dk", "dv", "drel_bias", "dr_h", "dr_w"), got, want, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape, name
        assert g.dtype == r.dtype, name
        assert np.all(np.isfinite(g)), name
        _close(g, r, dtype)
    again = nc.window_attention_backward(q, k, v, out, lse, do, wy, wx, **kw)
    for g, g2 in zip(got, again, strict=True):  # deterministic: bitwise equal
        assert (g is None and g2 is None) or np.array_equal(g, g2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("boundary", ["clamp", "zero", "mask"])
def test_na2d_bias_and_rel_pos(rng, dtype, boundary):
    kern = 3
    wy, wx = na_axis_windows(5, kern, 1, boundary), na_axis_windows(6, kern, 1, boundary)
    t = 2 * kern - 1
    _run(
        rng,
        dtype,
        wy,
        wx,
        boundary,
        batch=(2,),
        d=3,
        dv=4,
        bias_shape=(2, t, t),
        rh_shape=(t, 3),
        rw_shape=(2, t, 3),
    )


@pytest.mark.parametrize("boundary", ["clamp", "zero", "mask"])
def test_na2d_dilation_even_kernel(rng, boundary):
    # K = 2 (NATTEN's even window) with dilation 2 on a 5×6 image; a broadcast bias
    wy, wx = na_axis_windows(5, 2, 2, boundary), na_axis_windows(6, 2, 2, boundary)
    _run(rng, np.float64, wy, wx, boundary, batch=(1,), d=2, dv=3, bias_shape=(3, 3))


@pytest.mark.parametrize("boundary", ["clamp", "zero"])
def test_na2d_minus_inf_rel_bias(rng, boundary):
    """Finding 1: a -inf relative-bias entry in a query's first slot made the online softmax
    compute exp(-inf + inf) = NaN; head 1 reads only -inf (output 0, lse +inf)."""

    def edit(opt):
        opt["rel_bias"][0, 0, :] = -np.inf
        opt["rel_bias"][0, 1:, 0] = -np.inf
        opt["rel_bias"][1] = -np.inf

    wy, wx = na_axis_windows(4, 3, 1, boundary), na_axis_windows(5, 3, 1, boundary)
    _run(rng, np.float64, wy, wx, boundary, batch=(2,), d=2, dv=2, bias_shape=(2, 5, 5), edit=edit)


def test_na2d_dilated_k3_mask_no_tables(rng):
    wy, wx = na_axis_windows(5, 3, 2, "mask"), na_axis_windows(6, 3, 2, "mask")
    _run(rng, np.float64, wy, wx, "mask", batch=(1,), d=4, dv=1)


def test_na2d_only_r_w(rng):
    wy, wx = na_axis_windows(4, 3, 1, "zero"), na_axis_windows(5, 3, 1, "zero")
    _run(rng, np.float32, wy, wx, "zero", batch=(1,), d=2, dv=2, rw_shape=(5, 2))


def test_na1d_causal_as_2d(rng):
    # the 1-D op runs as H = 1 with a one-slot y axis; causal windows exclude keys before 0
    wy, wx = na_axis_windows(1, 1, 1, "clamp"), na_axis_windows(7, 3, 1, "clamp", causal=True)
    _run(rng, np.float64, wy, wx, "clamp", batch=(2,), d=3, dv=2, bias_shape=(2, 1, 5))


def test_halo_timm_tables(rng):
    # HaloNet: 2×2 blocks, halo 1, timm's 2(b+2h)-1 = 7-row tables (rows 0, 1 never read)
    wy, wx = halo_axis_windows(4, 2, 1, 7), halo_axis_windows(4, 2, 1, 7)
    _run(rng, np.float64, wy, wx, "zero", batch=(1,), d=2, dv=2, rh_shape=(7, 2), rw_shape=(7, 2))


def test_size_one_image(rng):
    wy, wx = na_axis_windows(1, 3, 1, "mask"), na_axis_windows(1, 3, 1, "mask")
    _run(rng, np.float64, wy, wx, "mask", batch=(1,), d=2, dv=2, bias_shape=(5, 5))


def _op_calls(rng):
    import arrayattn as aa

    q, k, v = (rng.standard_normal((1, 5, 6, 3)) for _ in range(3))
    bias = rng.standard_normal((1, 5, 5))
    rel = {"r_h": rng.standard_normal((5, 3)) / 2, "r_w": rng.standard_normal((5, 3)) / 2}
    yield aa.neighborhood_attention_2d._prepare(
        q, k, v, kernel_size=3, boundary="zero", rel_bias=bias, rel_pos=rel
    )
    yield aa.neighborhood_attention_2d._prepare(
        q, k, v, kernel_size=2, dilation=2, rel_pos=(rel["r_h"][:3], None)
    )
    q1, k1, v1 = (rng.standard_normal((2, 7, 3)) for _ in range(3))
    yield aa.neighborhood_attention_1d._prepare(
        q1, k1, v1, kernel_size=3, causal=True, rel_bias=rng.standard_normal((2, 5))
    )
    q2, k2, v2 = (rng.standard_normal((1, 4, 4, 2)) for _ in range(3))
    yield aa.halo_attention._prepare(
        q2, k2, v2, block_size=2, halo_size=1, rel_pos=(rng.standard_normal((5, 2)), None)
    )


def test_kernel_interface_matches_reference_kernel(rng):
    import arrayattn as aa

    REFERENCE = aa.neighborhood_attention_2d.reference
    for call in _op_calls(rng):
        kern = aa.neighborhood_attention_2d.adapt(nc.KERNELS["neighborhood_attention_2d"])
        assert kern.not_supported_reasons(call) == []
        outs, saved = kern.fwd(np, dict(call.arrays), call.options, True)
        routs, rsaved = REFERENCE.fwd(np, dict(call.arrays), call.options, True)
        np.testing.assert_allclose(outs[0], routs[0], rtol=0, atol=1e-12)
        assert set(saved) == set(rsaved)
        ct = (rng.standard_normal(outs[0].shape),)
        g = kern.bwd(np, saved, call.options, ct)
        rg = REFERENCE.bwd(np, rsaved, call.options, ct)
        assert set(g) == set(rg)
        for key in ("q", "k", "v", "rel_bias"):
            if rg[key] is None:
                assert g[key] is None
            else:
                assert g[key].shape == rg[key].shape
                np.testing.assert_allclose(g[key], rg[key], rtol=0, atol=1e-12)
        rp, rrp = g["rel_pos"], rg["rel_pos"]
        if rrp is None:
            assert rp is None
        else:
            assert type(rp) is type(rrp)
            items = rrp.items() if isinstance(rrp, dict) else enumerate(rrp)
            for key, r in items:
                if r is None:
                    assert rp[key] is None
                else:
                    np.testing.assert_allclose(rp[key], r, rtol=0, atol=1e-12)


def test_registered_for_all_local_ops():
    from arrayattn import _registry

    declared = _registry._backend_kernels("numba_cuda")
    for name in ("neighborhood_attention_2d", "neighborhood_attention_1d", "halo_attention"):
        assert declared[name] is nc.KERNELS[name]


def test_rejects_half_precision(rng):
    import arrayattn as aa

    q = rng.standard_normal((1, 3, 3, 2)).astype(np.float16)
    call = aa.neighborhood_attention_2d._prepare(q, q, q, kernel_size=3)
    reasons = nc.KERNELS["neighborhood_attention_2d"].not_supported_reasons(call)
    assert "float16" in " ".join(reasons)

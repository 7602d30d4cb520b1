"""numba_cuda scaled_dot_product_attention under the CUDA simulator == the array-API reference."""

from __future__ import annotations

import numpy as np
import pytest

from arrayattn._reference.attention import sdpa_backward as ref_bwd
from arrayattn._reference.attention import sdpa_forward as ref_fwd

nc = pytest.importorskip("arrayattn.backends.numba_cuda.attention")

BLOCKS = (4, 3)  # (query rows per block, key rows per tile): partial tiles on L = 5, 7
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype] * scale)


def _case(rng, dtype, *, hq=2, hkv=2, lq=5, lk=7, d=3, dv=2, mask=None, bias=None):
    q = rng.standard_normal((1, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((1, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((1, hkv, lk, dv)).astype(dtype)
    m = None
    if mask is not None:
        m = rng.random(mask) > 0.3
        m[..., 1, :] = False  # a fully masked row
    b = None if bias is None else rng.standard_normal(bias).astype(dtype)
    return q, k, v, m, b


def _run_both(q, k, v, m, b, causal, groups, dtype, rng, with_dlse=True):
    scale = 0.7
    kw = dict(mask=m, bias=b, causal=causal, scale=scale, gqa_groups=groups)
    out, lse = nc.sdpa_forward(q, k, v, blocks=BLOCKS, **kw)
    rout, rlse = ref_fwd(np, q, k, v, **kw)
    _close(out, rout, dtype)
    assert np.array_equal(np.isinf(lse), np.isinf(rlse))
    _close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(rlse), 0, rlse), dtype)
    do = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(dtype) if with_dlse else None
    got = nc.sdpa_backward(q, k, v, out, lse, do, dlse, blocks=BLOCKS, **kw)
    want = ref_bwd(np, q, k, v, rout, rlse, do, dlse, **kw)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        assert np.all(np.isfinite(g))
        _close(g, w, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_plain(rng, dtype):
    q, k, v, m, b = _case(rng, dtype)
    _run_both(q, k, v, m, b, None, 1, dtype, rng)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal_gqa(rng, causal):
    q, k, v, m, b = _case(rng, np.float64, hq=2, hkv=1, lq=5, lk=7)
    _run_both(q, k, v, m, b, causal, 2, np.float64, rng)


@pytest.mark.parametrize(("lq", "lk"), [(7, 5), (5, 7)])
def test_causal_bottom_right_shapes(rng, lq, lk):
    q, k, v, m, b = _case(rng, np.float64, hq=1, hkv=1, lq=lq, lk=lk)
    _run_both(q, k, v, m, b, "bottom_right", 1, np.float64, rng, with_dlse=False)


@pytest.mark.parametrize(
    ("mask_shape", "bias_shape"),
    [((1, 2, 5, 7), (2, 5, 7)), ((5, 7), (1, 1, 1, 7)), ((1, 1, 5, 1), (5, 1)), (None, (7,))],
)
def test_mask_bias_broadcast(rng, mask_shape, bias_shape):
    q, k, v, m, b = _case(rng, np.float64, mask=mask_shape, bias=bias_shape)
    _run_both(q, k, v, m, b, None, 1, np.float64, rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_minus_inf_bias_rows(rng, dtype):
    """-inf logits in the first key tiles of a row (running max still -inf), a row of -inf
    bias (empty: output 0, lse +inf) and a fully masked row, against the reference."""
    q, k, v, m, b = _case(rng, dtype, mask=(5, 7), bias=(5, 7))
    b[0, :4] = -np.inf
    b[2, :] = -np.inf
    b[3, ::2] = -np.inf
    _run_both(q, k, v, m, b, None, 1, dtype, rng)


BIAS_SHAPES = [
    (1, 1),
    (7,),
    (1, 7),
    (5, 1),
    (5, 7),
    (2, 1, 1),
    (2, 1, 7),
    (2, 5, 7),
    (1, 1, 5, 1),
    (1, 2, 1, 7),
    (1, 2, 5, 7),
]


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_bias_gradient_every_broadcast(rng, shape):
    """Finding 5: the bias gradient from the dQ kernel's dS tiles, reduced over the broadcast
    axes (partial query and key tiles, causal: skipped tiles contribute zeros), for every bias
    shape, (1, 1) included."""
    q, k, v, m, b = _case(rng, np.float64, bias=shape)
    _run_both(q, k, v, m, b, "bottom_right", 1, np.float64, rng)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (1, 7)], ids=str)
def test_bias_gradient_in_chunks(rng, monkeypatch, shape):
    """One query head per chunk of partials: the reduction adds each chunk to the gradient."""
    from arrayattn.backends import _cuda as _common

    monkeypatch.setattr(_common, "PARTIAL_BYTES", 1)
    q, k, v, m, b = _case(rng, np.float64, hq=2, hkv=1, bias=shape)
    _run_both(q, k, v, m, b, None, 2, np.float64, rng)


def test_mask_bias_causal_gqa_float32(rng):
    q, k, v, m, b = _case(rng, np.float32, hq=2, hkv=1, mask=(5, 7), bias=(1, 2, 5, 7))
    _run_both(q, k, v, m, b, "top_left", 2, np.float32, rng)


def test_empty_rows_zero_and_deterministic(rng):
    q, k, v, m, b = _case(rng, np.float64, mask=(1, 2, 5, 7))
    out, lse = nc.sdpa_forward(q, k, v, mask=m, scale=1.0, blocks=BLOCKS)
    assert np.all(out[..., 1, :] == 0)
    assert np.all(np.isposinf(lse[..., 1]))
    do = rng.standard_normal(out.shape)
    g1 = nc.sdpa_backward(q, k, v, out, lse, do, mask=m, scale=1.0, blocks=BLOCKS)
    g2 = nc.sdpa_backward(q, k, v, out, lse, do, mask=m, scale=1.0, blocks=BLOCKS)
    assert np.all(g1[0][..., 1, :] == 0)
    for a, b_ in zip(g1[:3], g2[:3], strict=True):
        assert np.array_equal(a, b_)


def test_kernel_interface_matches_reference(rng):
    """The registered Kernel's fwd/bwd (what the op calls on CuPy arrays) on simulator arrays."""
    import arrayattn as aa

    ref = aa.scaled_dot_product_attention.reference
    kern = aa.scaled_dot_product_attention.adapt(nc.KERNELS["scaled_dot_product_attention"])
    q, k, v, m, b = _case(rng, np.float64, lq=3, lk=4, mask=(3, 4), bias=(3, 4))
    call = aa.scaled_dot_product_attention._prepare(q, k, v, mask=m, bias=b, return_lse=True)
    assert kern.not_supported_reasons(call) == []
    outs, saved = kern.fwd(np, dict(call.arrays), call.options, True)
    routs, rsaved = ref.fwd(np, dict(call.arrays), call.options, True)
    for a, r in zip(outs, routs, strict=True):
        _close(a, r, np.float64)
    cts = tuple(rng.standard_normal(o.shape) for o in outs)
    g = kern.bwd(np, saved, call.options, cts)
    rg = ref.bwd(np, rsaved, call.options, cts)
    assert set(g) == set(rg)
    for key in rg:
        _close(g[key], rg[key], np.float64)
    call16 = aa.scaled_dot_product_attention._prepare(*(x.astype(np.float16) for x in (q, k, v)))
    assert "float32 or float64" in " ".join(kern.not_supported_reasons(call16))

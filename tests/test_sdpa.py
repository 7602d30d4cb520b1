"""scaled_dot_product_attention: dense float64 oracle, finite differences, tiling, edge cases.

The oracle (``support.sdpa_oracle``) materialises the scores; the library never does. Tests that
take the ``backend`` fixture run on every CPU backend that has a kernel (array_api, numba).
"""

from __future__ import annotations

import warnings

import array_api_compat
import array_api_compat.numpy as xnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from arrayattn._reference import attention as ref
from support import (
    RTOL,
    assert_close_rel,
    directional_check,
    require_kernel,
    sdpa_oracle,
    sdpa_oracle_grads,
    to_numpy,
    to_xp,
)

SDPA = aa.scaled_dot_product_attention

# -- cases ----------------------------------------------------------------------------------------
# Each case: shapes of q, k, v and the options; "mask"/"bias" give shapes, filled at random.

CASES = {
    "plain_3d": dict(q=(2, 3, 4), k=(2, 5, 4), v=(2, 5, 3)),
    "plain_4d_scale": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), scale=0.7),
    "mask_full": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), mask=(2, 2, 3, 4)),
    "mask_bcast_lk": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), mask=(4,)),
    "mask_bcast_b11k": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), mask=(2, 1, 1, 4)),
    "mask_bcast_lqlk": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), mask=(3, 4)),
    "bias_full": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), bias=(2, 2, 3, 4)),
    "bias_lk": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), bias=(4,)),
    "bias_1lq1": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), bias=(1, 3, 1)),
    "bias_h1lk": dict(q=(2, 2, 3, 3), k=(2, 2, 4, 3), v=(2, 2, 4, 2), bias=(2, 1, 4)),
    "mask_bias": dict(
        q=(1, 2, 4, 3), k=(1, 2, 5, 3), v=(1, 2, 5, 2), mask=(1, 4, 5), bias=(2, 1, 5)
    ),
    "causal_square": dict(q=(2, 4, 3), k=(2, 4, 3), v=(2, 4, 2), causal=True),
    "causal_tl_short_q": dict(q=(2, 3, 3), k=(2, 5, 3), v=(2, 5, 2), causal="top_left"),
    "causal_br_short_q": dict(q=(2, 3, 3), k=(2, 5, 3), v=(2, 5, 2), causal="bottom_right"),
    "causal_tl_long_q": dict(q=(2, 5, 3), k=(2, 3, 3), v=(2, 3, 2), causal="top_left"),
    "causal_br_long_q": dict(q=(2, 5, 3), k=(2, 3, 3), v=(2, 3, 2), causal="bottom_right"),
    "gqa_2of4": dict(q=(1, 4, 3, 3), k=(1, 2, 4, 3), v=(1, 2, 4, 2), enable_gqa=True),
    "gqa_mqa": dict(q=(2, 3, 3, 2), k=(2, 1, 4, 2), v=(2, 1, 4, 3), enable_gqa=True, causal=True),
    "gqa_mask_bias_br": dict(
        q=(1, 4, 3, 2),
        k=(1, 2, 5, 2),
        v=(1, 2, 5, 2),
        enable_gqa=True,
        mask=(1, 4, 1, 5),
        bias=(4, 3, 5),
        causal="bottom_right",
    ),
    "empty_rows": dict(q=(1, 2, 4, 3), k=(1, 2, 5, 3), v=(1, 2, 5, 2), mask="empty_rows"),
    "bias_neg_inf": dict(q=(2, 3, 3), k=(2, 4, 3), v=(2, 4, 2), bias="neg_inf"),
}


def build(spec, rng, dtype=np.float64):
    """(q, k, v, kwargs) for a case spec; float arrays in ``dtype``."""
    spec = dict(spec)
    q, k, v = (rng.standard_normal(spec.pop(n)).astype(dtype) for n in ("q", "k", "v"))
    lq, lk = q.shape[-2], k.shape[-2]
    kw = {}
    mask = spec.pop("mask", None)
    if mask == "empty_rows":
        mask = rng.random(q.shape[:-1] + (lk,)) > 0.3
        mask[0, 0, 1] = False  # one fully masked row in head 0
        mask[0, 1, :, 0] = False  # a masked key column
        mask[0, 1, 3] = False
        kw["mask"] = mask
    elif mask is not None:
        kw["mask"] = rng.random(mask) > 0.35
    bias = spec.pop("bias", None)
    if bias == "neg_inf":
        b = rng.standard_normal((lq, lk))
        b[0, 1:] = -np.inf  # only key 0 left for row 0
        b[1, :] = -np.inf  # row 1 fully masked through the bias
        kw["bias"] = b.astype(dtype)
    elif bias is not None:
        kw["bias"] = rng.standard_normal(bias).astype(dtype)
    kw.update(spec)
    return q, k, v, kw


# -- forward against the dense oracle ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_oracle(backend, case, dtype, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES[case], rng, dtype)
    out, lse = SDPA(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = sdpa_oracle(q, k, v, **kw)
    assert out.dtype == dtype
    assert out.shape == ref_out.shape
    assert lse.dtype == dtype
    assert lse.shape == ref_lse.shape
    assert_close_rel(out, ref_out, RTOL[dtype], "out")
    assert_close_rel(lse, ref_lse, RTOL[dtype], "lse")
    # Fully masked rows: output exactly 0, lse exactly +inf, never NaN.
    empty = np.isinf(ref_lse)
    assert np.all(out[empty] == 0)
    assert np.all(np.isposinf(lse[empty]))
    assert not np.isnan(out).any()
    # The plain call returns just the output, the same bits.
    np.testing.assert_array_equal(SDPA(q, k, v, **kw), out)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_dense_oracle(backend, case, dtype, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES[case], rng, dtype)
    out, res = SDPA.fwd(q, k, v, **kw)
    do = rng.standard_normal(out.shape).astype(dtype)
    g = SDPA.bwd(res, do)
    ref_grads = sdpa_oracle_grads(q, k, v, do, **kw)
    for name, got, want in zip(("q", "k", "v", "bias"), g, ref_grads, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape, name
        assert got.dtype == dtype, name
        assert not np.isnan(got).any(), name
        assert_close_rel(got, want, RTOL[dtype], f"d{name}", floor=1.0)


# -- finite differences ----------------------------------------------------------------------------


def _fd_check(q, k, v, kw, rng, *, with_lse=False, tol=1e-6, elementwise=True):
    """Every gradient (q, k, v, bias) against central differences of <ct, outputs>.

    ``elementwise``: every entry by its own difference quotient; otherwise the dot-product test
    ``<J^T ct, u> = <ct, J u>`` in three random directions u per argument (two calls each, for
    backends whose per-call cost makes entry-by-entry differences slow; the entries themselves
    are pinned by the array_api run and the dense-oracle comparison of the same backend).
    """
    if not elementwise:
        errors = directional_check(SDPA, (q, k, v), dict(kw, return_lse=with_lse), rng, tol=tol)
        assert set(errors) == {"q", "k", "v"} | ({"bias"} if "bias" in kw else set())
        return
    arrays = {"q": q, "k": k, "v": v, "bias": kw.get("bias")}
    rest = {key: val for key, val in kw.items() if key != "bias"}
    outs, res = SDPA.fwd(q, k, v, return_lse=with_lse, **kw)
    outs = outs if with_lse else (outs,)
    cts = tuple(rng.standard_normal(o.shape) for o in outs)
    grads = SDPA.bwd(res, cts if with_lse else cts[0])

    def loss(name):
        def f(x):
            call = dict(arrays, **{name: x})
            got = SDPA(
                call["q"], call["k"], call["v"], bias=call["bias"], return_lse=with_lse, **rest
            )
            got = got if with_lse else (got,)
            # A +inf logsumexp (empty row) is constant: it carries no gradient.
            return sum(
                float(np.sum(np.where(np.isfinite(o), o, 0.0) * c))
                for o, c in zip(got, cts, strict=True)
            )

        return f

    for name, x in arrays.items():
        if x is None:
            assert getattr(grads, name) is None
            continue
        g = getattr(grads, name)
        # A -inf bias entry stays -inf when perturbed: its difference quotient is 0, as is its
        # gradient.
        fd = numerical_gradient(loss(name), x)
        assert g.shape == fd.shape
        assert g.dtype == x.dtype
        err = np.max(np.abs(g - fd), initial=0.0)
        assert err <= tol * max(np.max(np.abs(fd), initial=0.0), 1e-3), (name, err)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_finite_differences(backend, case, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES[case], rng)
    _fd_check(q, k, v, kw, rng, elementwise=backend == "array_api")


@pytest.mark.parametrize(
    "case",
    [
        "plain_3d",
        "bias_h1lk",
        "causal_tl_short_q",
        "causal_br_long_q",
        "gqa_mask_bias_br",
        "empty_rows",
    ],
)
def test_lse_cotangent_matches_finite_differences(backend, case, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES[case], rng)
    _fd_check(q, k, v, kw, rng, with_lse=True, elementwise=backend == "array_api")


def test_lse_cotangent_alone(rng):
    """(None, dlse): the gradient of sum(dlse * lse) is scale * sum_j p_ij k_j for q."""
    q, k, v, kw = build(CASES["mask_bias"], rng)
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
    dlse = rng.standard_normal(lse.shape)
    g = SDPA.bwd(res, (None, dlse))
    want = sdpa_oracle_grads(q, k, v, np.zeros_like(out), dlse, **kw)
    for got, exp in zip(g, want, strict=True):
        assert_close_rel(got, exp, 1e-10, floor=1.0)
    assert np.all(g.v == 0)  # lse does not depend on v


def test_dot_product_identity(rng):
    """<do, J dx> = <J^T do, dx> by a directional difference, for every argument at once."""
    q, k, v, kw = build(CASES["gqa_mask_bias_br"], rng)
    errors = directional_errors(SDPA, (q, k, v), dict(kw, return_lse=True), rng=rng)
    assert set(errors) == {"q", "k", "v", "bias"}
    assert max(errors.values()) < 1e-6, errors


# -- tiled == untiled (the reference's online softmax) ---------------------------------------------

TILE_CASES = {
    "plain": dict(),
    "causal_tl": dict(causal="top_left"),
    "causal_br": dict(causal="bottom_right"),
    "mask": dict(mask=(2, 1, "Lq", "Lk")),
    "bias_full": dict(bias=(2, 3, "Lq", "Lk")),
    "bias_lk": dict(bias=("Lk",)),
    "bias_1lq1": dict(bias=(1, "Lq", 1)),
    "bias_h1lk": dict(bias=(3, 1, "Lk")),
    "causal_mask_bias": dict(causal="bottom_right", mask=("Lq", "Lk"), bias=(3, "Lq", "Lk")),
}


@pytest.mark.parametrize(("lq", "lk"), [(11, 13), (13, 11)])
@pytest.mark.parametrize("case", sorted(TILE_CASES))
def test_tiled_equals_one_tile(case, lq, lk, rng):
    spec = dict(TILE_CASES[case])
    q = rng.standard_normal((2, 3, lq, 4))
    k = rng.standard_normal((2, 3, lk, 4))
    v = rng.standard_normal((2, 3, lk, 5))
    sizes = {"Lq": lq, "Lk": lk}
    mask = bias = None
    if "mask" in spec:
        mask = rng.random(tuple(sizes.get(n, n) for n in spec["mask"])) > 0.3
    if "bias" in spec:
        bias = rng.standard_normal(tuple(sizes.get(n, n) for n in spec["bias"]))
    opts = dict(mask=mask, bias=bias, causal=spec.get("causal"), scale=0.4)
    do = rng.standard_normal((2, 3, lq, 5))
    dlse = rng.standard_normal((2, 3, lq))

    out1, lse1 = ref.sdpa_forward(xnp, q, k, v, block_q=lq, block_k=lk, **opts)
    g1 = ref.sdpa_backward(xnp, q, k, v, out1, lse1, do, dlse, block_q=lq, block_k=lk, **opts)
    # The one-tile run agrees with the dense oracle.
    oracle_opts = dict(mask=mask, bias=bias, causal=spec.get("causal", False), scale=0.4)
    assert_close_rel(out1, sdpa_oracle(q, k, v, **oracle_opts)[0], 1e-12)
    for got, want in zip(g1, sdpa_oracle_grads(q, k, v, do, dlse, **oracle_opts), strict=True):
        if want is not None:
            assert_close_rel(got, want, 1e-11, floor=1.0)

    for bq, bk in [(3, 5), (5, 3), (7, 7), (1, 2), (4, 13), (11, 1)]:
        out, lse = ref.sdpa_forward(xnp, q, k, v, block_q=bq, block_k=bk, **opts)
        g = ref.sdpa_backward(xnp, q, k, v, out, lse, do, dlse, block_q=bq, block_k=bk, **opts)
        assert_close_rel(out, out1, 1e-13, f"out {bq}x{bk}")
        np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse1))
        assert_close_rel(lse, lse1, 1e-13, f"lse {bq}x{bk}")
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), g, g1, strict=True):
            if b is None:
                assert a is None
                continue
            assert a.shape == b.shape
            assert_close_rel(a, b, 1e-12, f"{name} {bq}x{bk}", floor=1.0)


def test_causal_skip_is_exercised_and_exact(monkeypatch, rng):
    """Tiles past the diagonal are skipped (not computed) and the result is unchanged."""
    skipped = []
    original = ref._Scores.skipped

    def spy(self, i0, i1, j0):
        result = original(self, i0, i1, j0)
        skipped.append(result)
        return result

    monkeypatch.setattr(ref._Scores, "skipped", spy)
    q, k, v = (rng.standard_normal((2, 12, 3)) for _ in range(3))
    for causal in ("top_left", "bottom_right"):
        skipped.clear()
        out, lse = ref.sdpa_forward(
            xnp, q, k[:, :9], v[:, :9], causal=causal, scale=0.5, block_q=3, block_k=2
        )
        assert any(skipped)
        want, want_lse = sdpa_oracle(q, k[:, :9], v[:, :9], causal=causal, scale=0.5)
        assert_close_rel(out, want, 1e-12)
        assert_close_rel(lse, want_lse, 1e-12)


def test_fully_masked_rows_and_tiles(rng):
    """Whole key tiles and whole rows masked: zeros and +inf, zero gradients, no NaN, no warning."""
    q = rng.standard_normal((2, 2, 9, 4))
    k = rng.standard_normal((2, 2, 10, 4))
    v = rng.standard_normal((2, 2, 10, 3))
    mask = rng.random((2, 2, 9, 10)) > 0.4
    mask[..., 0:5] = False  # the first key tile (block_k = 5) is fully masked everywhere
    mask[0, 1, 2:5] = False  # rows 2..4 of (0, 1) fully masked: a whole query tile with block_q=3
    mask[1, 0, 7] = False
    bias = rng.standard_normal((2, 9, 10))
    do = rng.standard_normal((2, 2, 9, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for bq, bk in [(3, 5), (9, 10), (2, 3)]:
            out, lse = ref.sdpa_forward(
                xnp, q, k, v, mask=mask, bias=bias, scale=0.5, block_q=bq, block_k=bk
            )
            dq, dk, dv, db = ref.sdpa_backward(
                xnp, q, k, v, out, lse, do, mask=mask, bias=bias, scale=0.5, block_q=bq, block_k=bk
            )
            for a in (out, dq, dk, dv, db):
                assert not np.isnan(a).any()
            empty = ~mask.any(-1)
            assert np.all(out[empty] == 0)
            assert np.all(np.isposinf(lse[empty]))
            assert np.all(dq[empty] == 0)
            assert np.all(dk[..., 0:5, :] == 0)
            assert np.all(dv[..., 0:5, :] == 0)
            assert np.all(db[..., 0:5] == 0)
            want = sdpa_oracle_grads(q, k, v, do, mask=mask, bias=bias, scale=0.5)
            for got, exp in zip((dq, dk, dv, db), want, strict=True):
                assert_close_rel(got, exp, 1e-11, floor=1.0)


def test_all_rows_masked_public(backend, rng):
    require_kernel(SDPA, backend)
    q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    mask = np.zeros((3, 3), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (out, lse), res = SDPA.fwd(q, k, v, mask=mask, return_lse=True)
        g = SDPA.bwd(res, (np.ones_like(out), np.ones_like(lse)))
    assert np.all(out == 0)
    assert np.all(np.isposinf(lse))
    for a in g[:3]:
        assert np.all(a == 0)
    # bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing
    out, lse = SDPA(q, k[:, :1], v[:, :1], causal="bottom_right", return_lse=True)
    assert np.all(out[:, :2] == 0)
    assert np.all(np.isposinf(lse[:, :2]))
    assert np.all(np.isfinite(lse[:, 2]))


# -- edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lq", "lk", "d", "dv"),
    [
        (1, 1, 3, 2),
        (1, 5, 3, 2),
        (4, 1, 3, 2),
        (0, 4, 3, 2),
        (4, 0, 3, 2),
        (4, 5, 0, 2),
        (4, 5, 3, 0),
        (0, 0, 0, 0),
    ],
)
@pytest.mark.parametrize("with_options", [False, True])
def test_degenerate_sizes(backend, lq, lk, d, dv, with_options, rng):
    require_kernel(SDPA, backend)
    q, k, v = (rng.standard_normal((2, 1, n, w)) for n, w in ((lq, d), (lk, d), (lk, dv)))
    kw = {}
    if with_options:
        kw = dict(
            mask=rng.random((lq, lk)) > 0.3, bias=rng.standard_normal((lk,)), causal="bottom_right"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
        do, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
        g = SDPA.bwd(res, (do, np.where(np.isfinite(lse), dlse, 0.0)))
    want_out, want_lse = sdpa_oracle(q, k, v, **kw)
    assert out.shape == (2, 1, lq, dv)
    assert lse.shape == (2, 1, lq)
    assert_close_rel(out, want_out, 1e-12)
    assert_close_rel(lse, want_lse, 1e-12)
    if lk == 0:
        assert np.all(np.isposinf(lse))
        assert np.all(out == 0)
    want = sdpa_oracle_grads(q, k, v, do, np.where(np.isfinite(lse), dlse, 0.0), **kw)
    for name, got, exp, x in zip("qkvb", g, want, (q, k, v, kw.get("bias")), strict=True):
        if x is None:
            assert got is None
            continue
        assert got.shape == x.shape, name
        assert_close_rel(got, exp, 1e-11, name, floor=1.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_huge_logits_stay_finite(dtype, rng):
    q = (rng.standard_normal((2, 6, 8)) * 1e2).astype(dtype)
    k = (rng.standard_normal((2, 7, 8)) * 1e2).astype(dtype)
    v = rng.standard_normal((2, 7, 3)).astype(dtype)
    # logits ~ 1e4 / sqrt(8): a naive exp overflows; the online softmax must not.
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, causal=True)
    g = SDPA.bwd(res, (np.ones_like(out), None))
    for a in (out, lse, *g[:3]):
        assert np.isfinite(a).all()
    want, want_lse = sdpa_oracle(q, k, v, causal=True)
    # Saturated softmax: the output is (nearly) the value at the argmax key.
    assert_close_rel(out, want, {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3}[dtype])
    assert_close_rel(lse, want_lse, {np.float64: 1e-12, np.float32: 1e-6, np.float16: 1e-3}[dtype])


def test_huge_bias_stays_finite(backend, rng):
    require_kernel(SDPA, backend)
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    bias = rng.standard_normal((5, 5)) * 1e4
    (out, lse), res = SDPA.fwd(q, k, v, bias=bias, return_lse=True)
    g = SDPA.bwd(res, (np.ones_like(out), np.ones_like(lse)))
    assert all(np.isfinite(a).all() for a in (out, lse, *g))
    assert_close_rel(out, sdpa_oracle(q, k, v, bias=bias)[0], 1e-10)


def test_nan_input_propagates_to_affected_rows(backend, rng):
    require_kernel(SDPA, backend)
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    q[0, 1, 0] = np.nan  # query row (0, 1) only
    k[1, 2, 0] = np.nan  # key 2 of batch 1: rows 2, 3 under causal
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", RuntimeWarning
        )  # NaN propagates quietly: no RuntimeWarning either
        (out, lse), res = SDPA.fwd(q, k, v, causal=True, return_lse=True)
        g = SDPA.bwd(res, (np.ones_like(out), None))
    bad = np.zeros((2, 4), dtype=bool)
    bad[0, 1] = bad[1, 2] = bad[1, 3] = True
    np.testing.assert_array_equal(np.isnan(out).any(-1), bad)
    np.testing.assert_array_equal(np.isnan(out).all(-1), bad)
    np.testing.assert_array_equal(np.isnan(lse), bad)
    assert not np.isnan(g.q[0, [0, 2, 3]]).any()  # untouched rows of batch 0 stay clean
    want, _ = sdpa_oracle(np.nan_to_num(q), np.nan_to_num(k), v, causal=True)
    assert_close_rel(out[~bad], want[~bad], 1e-12)


def test_inf_in_values_propagates(rng):
    q, k, v = (rng.standard_normal((1, 3, 2)) for _ in range(3))
    v[0, 0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = SDPA(q, k, v, causal=True)
    assert np.all(np.isposinf(out[0, :, 0]))
    assert np.isfinite(out[0, :, 1]).all()


# -- array namespaces ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gqa_mask_bias_br", "empty_rows"])
def test_array_api_namespaces(xp, case, rng):
    q, k, v, kw = build(CASES[case], rng)
    do = rng.standard_normal(sdpa_oracle(q, k, v, **kw)[0].shape)
    with aa.use_backend("array_api"):
        (out, lse), res = SDPA.fwd(
            *(to_xp(xp, a) for a in (q, k, v)),
            return_lse=True,
            **{n: to_xp(xp, a) if n in ("mask", "bias") else a for n, a in kw.items()},
        )
        g = SDPA.bwd(res, (to_xp(xp, do), None))
    assert res.backend == "array_api"
    assert array_api_compat.array_namespace(out) is array_api_compat.array_namespace(to_xp(xp, q))
    want_out, want_lse = sdpa_oracle(q, k, v, **kw)
    assert_close_rel(to_numpy(out), want_out, 1e-12, "out")
    assert_close_rel(to_numpy(lse), want_lse, 1e-12, "lse")
    for name, got, want in zip("qkvb", g, sdpa_oracle_grads(q, k, v, do, **kw), strict=True):
        if want is None:
            assert got is None
        else:
            assert_close_rel(to_numpy(got), want, 1e-11, name, floor=1.0)


# -- low precision: FlashAttention's criterion -----------------------------------------------------


def _fa_criterion(got, ref64, naive, what, eps):
    err = np.max(np.abs(np.asarray(got, np.float64) - ref64))
    naive_err = np.max(np.abs(np.asarray(naive, np.float64) - ref64))
    assert err <= 2 * naive_err + eps, f"{what}: {err:.3e} > 2 * {naive_err:.3e} + {eps}"


LOW_CASES = {
    "4d": dict(q=(1, 2, 40, 16), k=(1, 2, 40, 16), v=(1, 2, 40, 16)),
    "causal_br": dict(q=(2, 24, 16), k=(2, 40, 16), v=(2, 40, 16), causal="bottom_right"),
    "gqa_causal": dict(
        q=(1, 4, 40, 16), k=(1, 2, 40, 16), v=(1, 2, 40, 16), enable_gqa=True, causal=True
    ),
}


@pytest.mark.parametrize("case", sorted(LOW_CASES))
def test_numpy_float16_accumulates_in_float32(case):
    rng = np.random.default_rng(7)
    q, k, v, kw = build(LOW_CASES[case], rng, np.float16)
    kw["mask"] = rng.random((q.shape[-2], 40)) > 0.2
    kw["bias"] = rng.standard_normal((40,)).astype(np.float16)
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
    assert out.dtype == np.float16
    assert lse.dtype == np.float32
    do = rng.standard_normal(out.shape).astype(np.float16)
    g = SDPA.bwd(res, (do, None))
    ref_out, ref_lse = sdpa_oracle(q, k, v, **kw)
    naive_out, naive_lse = sdpa_oracle(q, k, v, dtype=np.float16, **kw)
    _fa_criterion(out, ref_out, naive_out, "out", 1e-4)
    _fa_criterion(lse, ref_lse, naive_lse, "lse", 1e-4)
    ref_g = sdpa_oracle_grads(q, k, v, do, **kw)
    naive_g = sdpa_oracle_grads(q, k, v, do, dtype=np.float16, **kw)
    for name, got, r, nv in zip("qkvb", g, ref_g, naive_g, strict=True):
        assert got.dtype == np.float16
        _fa_criterion(got, r, nv, f"d{name}", 1e-4)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", sorted(LOW_CASES))
def test_torch_low_precision(dtype_name, case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    dtype = getattr(torch, dtype_name)
    q, k, v, kw = build(LOW_CASES[case], rng)
    mask = rng.random((q.shape[-2], 40)) > 0.2
    bias = rng.standard_normal((40,))
    do = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    # Round the float64 inputs to the low dtype first: the reference sees exactly those values.
    tq, tk, tv, tb, tdo = (torch.asarray(a).to(dtype) for a in (q, k, v, bias, do))
    q, k, v, bias, do = (t.double().numpy() for t in (tq, tk, tv, tb, tdo))
    tmask = torch.asarray(mask)
    with aa.use_backend("array_api"):
        out, res = SDPA.fwd(tq, tk, tv, mask=tmask, bias=tb, **kw)
        g = SDPA.bwd(res, tdo)
    assert out.dtype == dtype
    assert all(x.dtype == dtype for x in g)
    ref_out, _ = sdpa_oracle(q, k, v, mask=mask, bias=bias, **kw)
    ref_g = sdpa_oracle_grads(q, k, v, do, mask=mask, bias=bias, **kw)

    # The naive baseline: materialised attention computed in the low dtype, with torch autograd.
    nq, nk, nv, nb = (t.clone().requires_grad_(True) for t in (tq, tk, tv, tb))
    kk, vv = nk, nv
    if kw.get("enable_gqa"):
        groups = nq.shape[-3] // nk.shape[-3]
        kk, vv = nk.repeat_interleave(groups, -3), nv.repeat_interleave(groups, -3)
    s = (nq @ kk.transpose(-1, -2)) * (1.0 / np.sqrt(q.shape[-1])) + nb
    keep = tmask
    if kw.get("causal"):
        from support import causal_keep

        keep = keep & torch.asarray(causal_keep(q.shape[-2], k.shape[-2], kw["causal"]))
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    naive = p @ vv
    naive.backward(tdo)
    _fa_criterion(out.float().numpy(), ref_out, naive.detach().float().numpy(), "out", 1e-3)
    for name, got, r, nv_ in zip("qkvb", g, ref_g, (nq, nk, nv, nb), strict=True):
        _fa_criterion(got.float().numpy(), r, nv_.grad.float().numpy(), f"d{name}", 1e-3)


# -- property tests --------------------------------------------------------------------------------


@st.composite
def sdpa_calls(draw):
    batch = draw(st.lists(st.integers(1, 2), min_size=0, max_size=2))
    gqa = draw(st.booleans()) and len(batch) >= 1
    hq = batch[-1] if batch else 1
    hkv = hq
    if gqa:
        hkv = draw(st.sampled_from([h for h in (1, 2) if hq % h == 0]))
    lq, lk = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    d, dv = draw(st.integers(0, 4)), draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kv_batch = batch[:-1] + [hkv] if batch else []
    q = rng.standard_normal(tuple(batch) + (lq, d)) * draw(st.sampled_from([0.5, 3.0]))
    k = rng.standard_normal(tuple(kv_batch) + (lk, d))
    v = rng.standard_normal(tuple(kv_batch) + (lk, dv))
    full = tuple(batch) + (lq, lk)

    def bshape():
        # A random broadcastable shape: drop leading axes, set some to 1.
        nd = draw(st.integers(0, len(full)))
        return tuple(1 if draw(st.booleans()) else n for n in full[len(full) - nd :])

    kw = dict(enable_gqa=gqa) if gqa else {}
    if draw(st.booleans()):
        kw["mask"] = rng.random(bshape()) > draw(st.sampled_from([0.2, 0.6]))
    if draw(st.booleans()):
        kw["bias"] = rng.standard_normal(bshape())
    kw["causal"] = draw(st.sampled_from([False, True, "top_left", "bottom_right"]))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    return q, k, v, kw, seed


@given(sdpa_calls())
def test_property_forward_and_backward_vs_oracle(call):
    q, k, v, kw, seed = call
    rng = np.random.default_rng(seed + 1)
    with aa.use_backend("array_api"):
        (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
        do = rng.standard_normal(out.shape)
        dlse = np.where(np.isfinite(lse), rng.standard_normal(lse.shape), 0.0)
        g = SDPA.bwd(res, (do, dlse))
    want_out, want_lse = sdpa_oracle(q, k, v, **kw)
    assert_close_rel(out, want_out, 1e-11, "out")
    assert_close_rel(lse, want_lse, 1e-11, "lse")
    for name, got, want in zip("qkvb", g, sdpa_oracle_grads(q, k, v, do, dlse, **kw), strict=True):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape
            assert_close_rel(got, want, 1e-10, name, floor=1.0)


@given(sdpa_calls(), st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 4, 7]))
def test_property_any_tiling_is_exact(call, bq, bk):
    q, k, v, kw, _ = call
    groups = q.shape[-3] // k.shape[-3] if kw.get("enable_gqa") else 1
    causal = {False: None, True: "top_left"}.get(kw.get("causal"), kw.get("causal"))
    opts = dict(
        mask=kw.get("mask"),
        bias=kw.get("bias"),
        causal=causal,
        gqa_groups=groups,
        scale=kw.get("scale", 0.5),
    )
    out, lse = ref.sdpa_forward(xnp, q, k, v, block_q=bq, block_k=bk, **opts)
    want_out, want_lse = sdpa_oracle(q, k, v, **dict(kw, scale=opts["scale"]))
    assert_close_rel(out, want_out, 1e-11, "out")
    assert_close_rel(lse, want_lse, 1e-11, "lse")
    do = np.ones(out.shape)
    grads = ref.sdpa_backward(xnp, q, k, v, out, lse, do, block_q=bq, block_k=bk, **opts)
    want = sdpa_oracle_grads(q, k, v, do, **dict(kw, scale=opts["scale"]))
    for name, got, exp in zip("qkvb", grads, want, strict=True):
        if exp is None:
            assert got is None
        else:
            assert_close_rel(got, exp, 1e-10, name, floor=1.0)


# -- input validation ------------------------------------------------------------------------------


def _qkv(rng, dtype=np.float64):
    return (
        rng.standard_normal((2, 3, 4)).astype(dtype),
        rng.standard_normal((2, 5, 4)).astype(dtype),
        rng.standard_normal((2, 5, 6)).astype(dtype),
    )


BAD = [
    # (label, call(q, k, v) -> (args, kwargs), exception, words that must appear)
    ("q not an array", lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, ["q", "array"]),
    ("k not an array", lambda q, k, v: ((q, "k", v), {}), TypeError, ["k", "array"]),
    ("int dtype", lambda q, k, v: ((q.astype(np.int64), k, v), {}), TypeError, ["q", "int64"]),
    ("bool v", lambda q, k, v: ((q, k, v > 0), {}), TypeError, ["v", "bool"]),
    (
        "mismatched dtypes",
        lambda q, k, v: ((q, k.astype(np.float32), v), {}),
        TypeError,
        ["k", "float32", "float64"],
    ),
    ("q rank 1", lambda q, k, v: ((q[0, 0], k, v), {}), ValueError, ["q", "(4,)"]),
    ("k rank differs", lambda q, k, v: ((q, k[0], v), {}), ValueError, ["k", "(5, 4)"]),
    ("d mismatch", lambda q, k, v: ((q, k[..., :3], v), {}), ValueError, ["k", "d = 4"]),
    ("Lk mismatch k/v", lambda q, k, v: ((q, k, v[:, :4]), {}), ValueError, ["v", "Lk = 5"]),
    ("batch mismatch", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError, ["k", "(2,)"]),
    (
        "mask not bool",
        lambda q, k, v: ((q, k, v), {"mask": np.ones((3, 5))}),
        TypeError,
        ["mask", "float64"],
    ),
    (
        "mask int",
        lambda q, k, v: ((q, k, v), {"mask": np.ones((3, 5), np.int8)}),
        TypeError,
        ["mask", "int8"],
    ),
    (
        "mask not broadcastable",
        lambda q, k, v: ((q, k, v), {"mask": np.ones((3, 4), bool)}),
        ValueError,
        ["mask", "(3, 4)", "(2, 3, 5)"],
    ),
    (
        "mask too many dims",
        lambda q, k, v: ((q, k, v), {"mask": np.ones((1, 1, 3, 5), bool)}),
        ValueError,
        ["mask", "(1, 1, 3, 5)"],
    ),
    (
        "bias not broadcastable",
        lambda q, k, v: ((q, k, v), {"bias": np.ones((2, 5, 3))}),
        ValueError,
        ["bias", "(2, 5, 3)"],
    ),
    (
        "bias int",
        lambda q, k, v: ((q, k, v), {"bias": np.ones((3, 5), np.int32)}),
        TypeError,
        ["bias", "int32"],
    ),
    ("bias not an array", lambda q, k, v: ((q, k, v), {"bias": 1.0}), TypeError, ["bias", "float"]),
    (
        "causal string",
        lambda q, k, v: ((q, k, v), {"causal": "upper"}),
        ValueError,
        ["causal", "upper"],
    ),
    ("causal int", lambda q, k, v: ((q, k, v), {"causal": 1.5}), ValueError, ["causal", "1.5"]),
    ("causal None", lambda q, k, v: ((q, k, v), {"causal": None}), ValueError, ["causal", "None"]),
    (
        "scale nan",
        lambda q, k, v: ((q, k, v), {"scale": float("nan")}),
        ValueError,
        ["scale", "nan"],
    ),
    (
        "scale inf",
        lambda q, k, v: ((q, k, v), {"scale": float("inf")}),
        ValueError,
        ["scale", "inf"],
    ),
    ("scale bool", lambda q, k, v: ((q, k, v), {"scale": True}), TypeError, ["scale", "bool"]),
    ("scale string", lambda q, k, v: ((q, k, v), {"scale": "0.5"}), TypeError, ["scale", "str"]),
    (
        "scale array",
        lambda q, k, v: ((q, k, v), {"scale": np.ones(2)}),
        TypeError,
        ["scale", "ndarray"],
    ),
    (
        "enable_gqa not bool",
        lambda q, k, v: ((q, k, v), {"enable_gqa": 1}),
        TypeError,
        ["enable_gqa", "int"],
    ),
    (
        "return_lse not bool",
        lambda q, k, v: ((q, k, v), {"return_lse": "yes"}),
        TypeError,
        ["return_lse", "str"],
    ),
    (
        "gqa heads do not divide",
        lambda q, k, v: (
            (np.ones((1, 3, 2, 4)), np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 6))),
            {"enable_gqa": True},
        ),
        ValueError,
        ["k", "heads", "3"],
    ),
    (
        "gqa k/v heads differ",
        lambda q, k, v: (
            (np.ones((1, 4, 2, 4)), np.ones((1, 2, 5, 4)), np.ones((1, 1, 5, 6))),
            {"enable_gqa": True},
        ),
        ValueError,
        ["v", "(1, 1, 5, 6)"],
    ),
    (
        "gqa needs heads axis",
        lambda q, k, v: ((q[0], k[0], v[0]), {"enable_gqa": True}),
        ValueError,
        ["q", "heads"],
    ),
    (
        "heads differ without gqa",
        lambda q, k, v: ((np.ones((1, 4, 2, 4)), np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 6))), {}),
        ValueError,
        ["k", "enable_gqa"],
    ),
    ("unknown keyword", lambda q, k, v: ((q, k, v), {"dropout": 0.1}), TypeError, ["dropout"]),
    ("positional mask", lambda q, k, v: ((q, k, v, np.ones((3, 5), bool)), {}), TypeError, []),
]


@pytest.mark.parametrize(("label", "make", "exc", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(label, make, exc, words, rng):
    args, kwargs = make(*_qkv(rng))
    with pytest.raises(exc) as info:
        SDPA(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    # fwd validates the same way
    with pytest.raises(exc):
        SDPA.fwd(*args, **kwargs)


def test_mixed_namespaces_are_a_type_error(rng):
    torch = pytest.importorskip("torch")
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match="namespaces") as info:
        SDPA(q, torch.asarray(k), v)
    assert "k is a torch array" in str(info.value)
    assert "q is a numpy array" in str(info.value)
    with pytest.raises(TypeError, match="mask is a torch array"):
        SDPA(q, k, v, mask=torch.ones((3, 5), dtype=torch.bool))
    with pytest.raises(TypeError, match="bias is a torch array"):
        SDPA(q, k, v, bias=torch.ones((3, 5), dtype=torch.float64))


# -- memory contract and determinism ---------------------------------------------------------------


def test_readonly_inputs_unchanged_and_outputs_do_not_alias(backend, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES["gqa_mask_bias_br"], rng)
    inputs = {"q": q, "k": k, "v": v, "mask": kw["mask"], "bias": kw["bias"]}
    copies = {n: a.copy() for n, a in inputs.items()}
    for a in inputs.values():
        a.flags.writeable = False
    (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
    do = rng.standard_normal(out.shape)
    do.flags.writeable = False
    g = SDPA.bwd(res, (do, None))
    for n, a in inputs.items():
        np.testing.assert_array_equal(a, copies[n], err_msg=n)
    for produced in (out, lse, *g):
        for n, a in {**inputs, "do": do}.items():
            assert not np.shares_memory(produced, a), n


def test_identity_like_cases_do_not_return_views(rng):
    """Lk = 1 (output equals v broadcast) and Lq = Lk = 1 must still be fresh arrays."""
    q, k, v = (
        rng.standard_normal((2, 1, 3)),
        rng.standard_normal((2, 1, 3)),
        rng.standard_normal((2, 1, 3)),
    )
    out, res = SDPA.fwd(q, k, v)
    g = SDPA.bwd(res, v)
    for produced in (out, *g[:3]):
        for a in (q, k, v):
            assert not np.shares_memory(produced, a)


def test_deterministic(backend, rng):
    require_kernel(SDPA, backend)
    q, k, v, kw = build(CASES["gqa_mask_bias_br"], rng)
    runs = []
    for _ in range(2):
        (out, lse), res = SDPA.fwd(q, k, v, return_lse=True, **kw)
        g = SDPA.bwd(res, (np.ones_like(out), np.ones_like(lse)))
        runs.append((out, lse, *g))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.tobytes() == b.tobytes()

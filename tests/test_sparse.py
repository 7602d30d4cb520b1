"""sparse_attention and sparse_attention_mask (Sparse Transformer (derivation:
docs/derivations/sparse.rst)).

The masks are checked against index sets listed by hand from the paper's definitions (§4.3);
sparse_attention against the dense float64 oracle with that mask and against arrayattn's
scaled_dot_product_attention(mask=...), forward and backward.
"""

from __future__ import annotations

import tracemalloc

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import (
    RTOL,
    assert_close_rel,
    require_kernel,
    sdpa_oracle,
    sdpa_oracle_grads,
    to_xp,
)

SA = aa.sparse_attention
MASK = aa.sparse_attention_mask


def keys_of(mask, i):
    return set(np.flatnonzero(np.asarray(mask)[i]).tolist())


# -- masks vs hand-listed index sets -------------------------------------------------------------


def test_strided_sets_by_hand():
    # l = 3, query 7: A1 = {max(0, 7-3), ..., 7} = {4, 5, 6, 7}; A2 = {j <= 7 : (7-j) % 3 == 0}
    # = {1, 4, 7}
    assert keys_of(MASK(10, pattern="strided", stride=3, combine="interleaved", layer=0), 7) == {
        4,
        5,
        6,
        7,
    }
    assert keys_of(MASK(10, pattern="strided", stride=3, combine="interleaved", layer=1), 7) == {
        1,
        4,
        7,
    }
    assert keys_of(MASK(10, pattern="strided", stride=3), 7) == {1, 4, 5, 6, 7}
    # openai's band of l positions: {5, 6, 7}
    assert keys_of(MASK(10, pattern="strided", stride=3, local_width=3), 7) == {1, 4, 5, 6, 7}
    assert keys_of(
        MASK(10, pattern="strided", stride=3, local_width=3, combine="interleaved"), 7
    ) == {5, 6, 7}
    assert keys_of(MASK(10, pattern="strided", stride=3), 0) == {0}
    assert keys_of(MASK(10, pattern="strided", stride=3), 2) == {0, 1, 2}
    assert keys_of(MASK(10, pattern="strided", stride=3), 9) == {0, 3, 6, 7, 8, 9}
    # interleaved alternates with the residual-block index
    np.testing.assert_array_equal(
        MASK(10, pattern="strided", stride=3, combine="interleaved", layer=3),
        MASK(10, pattern="strided", stride=3, combine="interleaved", layer=1),
    )


def test_fixed_sets_by_hand():
    # l = 4, c = 1, query 9 (block 2 = {8..11}): A1 = {8, 9}; A2 = {j <= 9 : j % 4 == 3} = {3, 7}
    kw = {"pattern": "fixed", "stride": 4, "summary": 1}
    assert keys_of(MASK(12, **kw, combine="interleaved", layer=0), 9) == {8, 9}
    assert keys_of(MASK(12, **kw, combine="interleaved", layer=1), 9) == {3, 7}
    assert keys_of(MASK(12, **kw), 9) == {3, 7, 8, 9}
    assert keys_of(MASK(12, **kw), 3) == {0, 1, 2, 3}
    # A2 alone leaves the first queries of block 0 with nothing to attend to
    assert keys_of(MASK(12, **kw, combine="interleaved", layer=1), 0) == set()
    # c = 2: the last two of every block, {2, 3, 6, 7} for query 9
    assert keys_of(MASK(12, pattern="fixed", stride=4, summary=2), 9) == {2, 3, 6, 7, 8, 9}
    # multihead, c = 2: head 0 the last two of each block, head 1 the two before, head 2 = head 0
    m = MASK(12, pattern="fixed", stride=4, summary=2, combine="multihead", num_heads=3)
    assert m.shape == (3, 12, 12)
    assert keys_of(m[0], 9) == {2, 3, 6, 7, 8, 9}
    assert keys_of(m[1], 9) == {0, 1, 4, 5, 8, 9}
    np.testing.assert_array_equal(m[2], m[0])


def test_strided_multihead_heads_alternate():
    m = MASK(10, pattern="strided", stride=3, combine="multihead", num_heads=3)
    assert keys_of(m[0], 7) == {4, 5, 6, 7}
    assert keys_of(m[1], 7) == {1, 4, 7}
    np.testing.assert_array_equal(m[2], m[0])


def test_mask_namespace(xp):
    m = MASK(9, pattern="fixed", stride=3, summary=1, xp=xp)
    assert xp.isdtype(m.dtype, "bool")
    assert tuple(m.shape) == (9, 9)
    np.testing.assert_array_equal(
        np.asarray(m.__array__() if hasattr(m, "__array__") else m),
        MASK(9, pattern="fixed", stride=3, summary=1),
    )


# -- sparse_attention vs the dense masked oracle ---------------------------------------------------

CONFIGS = [
    {"pattern": "strided", "stride": 3},
    {"pattern": "strided", "stride": 4, "local_width": 4},
    {"pattern": "strided", "stride": 2, "local_width": 7},
    {"pattern": "strided", "stride": 1},
    {"pattern": "strided", "stride": 3, "combine": "interleaved", "layer": 0},
    {"pattern": "strided", "stride": 3, "combine": "interleaved", "layer": 1},
    {"pattern": "strided", "stride": 3, "local_width": 3, "combine": "multihead"},
    {"pattern": "fixed", "stride": 4, "summary": 2},
    {"pattern": "fixed", "stride": 4, "summary": 1},
    {"pattern": "fixed", "stride": 3, "summary": 3},
    {"pattern": "fixed", "stride": 4, "summary": 1, "combine": "interleaved", "layer": 0},
    {"pattern": "fixed", "stride": 4, "summary": 1, "combine": "interleaved", "layer": 1},
    {"pattern": "fixed", "stride": 4, "summary": 2, "combine": "multihead"},
    {"pattern": "fixed", "stride": 6, "summary": 2, "combine": "multihead"},
]


def _mask_for(length, cfg, heads):
    return MASK(length, num_heads=heads if cfg.get("combine") == "multihead" else None, **cfg)


def _qkv(rng, shape, dv=3, dtype=np.float64):
    q, k = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape[:-1] + (dv,)).astype(dtype)
    do = rng.standard_normal(v.shape).astype(dtype)
    return q, k, v, do


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(x) for x in c.values()))
@pytest.mark.parametrize("length", [1, 7, 16, 29])
def test_vs_dense_oracle(backend, cfg, length, rng):
    require_kernel(SA, backend)
    q, k, v, do = _qkv(rng, (2, 4, length, 3))
    mask = _mask_for(length, cfg, 4)
    out, res = SA.fwd(q, k, v, **cfg)
    assert res.backend == backend
    g = SA.bwd(res, do)
    want = sdpa_oracle(q, k, v, mask=mask)[0]
    dq, dk, dv, _ = sdpa_oracle_grads(q, k, v, do, mask=mask)
    for got, ref, what in zip(
        (out, *g), (want, dq, dk, dv), ("out", "dq", "dk", "dv"), strict=True
    ):
        # floor 1: the problem's scale (unit normal inputs) for results that are exactly 0 (L = 1)
        assert_close_rel(got, ref, RTOL[np.float64], what, floor=1.0)


@given(
    length=st.integers(1, 40),
    stride=st.integers(1, 9),
    width=st.integers(1, 20),
    data=st.data(),
)
def test_vs_sdpa_property(length, stride, width, data):
    pattern = data.draw(st.sampled_from(["strided", "fixed"]))
    combine = data.draw(st.sampled_from(["merged", "interleaved", "multihead"]))
    cfg = {
        "pattern": pattern,
        "stride": stride,
        "combine": combine,
        "layer": data.draw(st.integers(0, 3)),
    }
    if pattern == "strided":
        cfg["local_width"] = width
    else:
        divisors = [c for c in range(1, stride + 1) if combine != "multihead" or stride % c == 0]
        cfg["summary"] = data.draw(st.sampled_from(divisors))
    rng = np.random.default_rng(length * 100 + stride)
    q, k, v, do = _qkv(rng, (1, 3, length, 2), dv=2)
    mask = _mask_for(length, cfg, 3)
    ref, res_d = aa.scaled_dot_product_attention.fwd(q, k, v, mask=mask, scale=0.8)
    g_d = aa.scaled_dot_product_attention.bwd(res_d, do)
    out, res = SA.fwd(q, k, v, scale=0.8, **cfg)
    g = SA.bwd(res, do)
    for got, want in zip((out, *g), (ref, *g_d[:3]), strict=True):
        assert_close_rel(got, want, 1e-12, floor=1.0)


def test_long_sequence_tiles(backend, rng):
    require_kernel(SA, backend)
    # several band tiles (128) and residue/summary blocks, ragged length
    q, k, v, do = _qkv(rng, (1, 1, 300, 4), dv=2)
    for cfg in (
        {"pattern": "strided", "stride": 17},
        {"pattern": "fixed", "stride": 20, "summary": 5},
        {"pattern": "strided", "stride": 10, "local_width": 150},
    ):
        mask = MASK(300, **cfg)
        out, res = SA.fwd(q, k, v, **cfg)
        g = SA.bwd(res, do)
        dq, dk, dv, _ = sdpa_oracle_grads(q, k, v, do, mask=mask)
        assert_close_rel(out, sdpa_oracle(q, k, v, mask=mask)[0], RTOL[np.float64])
        for got, want in zip(g, (dq, dk, dv), strict=True):
            assert_close_rel(got, want, RTOL[np.float64])


def test_finite_differences(rng):
    q, k, v, do = _qkv(rng, (1, 2, 7, 2), dv=2)
    for cfg in ({"pattern": "fixed", "stride": 3, "summary": 1, "combine": "multihead"},):
        _, res = SA.fwd(q, k, v, **cfg)
        g = SA.bwd(res, do)
        args = {"q": q, "k": k, "v": v}
        for name in args:

            def f(x, name=name, cfg=cfg):
                return float(np.sum(SA(**{**args, name: x}, **cfg) * do))

            np.testing.assert_allclose(
                getattr(g, name),
                numerical_gradient(f, args[name]),
                rtol=1e-6,
                atol=1e-8,
                err_msg=name,
            )
    for cfg in (
        {"pattern": "fixed", "stride": 3, "summary": 2},
        {"pattern": "strided", "stride": 2},
    ):
        errors = directional_errors(SA, (q, k, v), cfg, rng=rng)
        assert max(errors.values()) < 1e-6, errors


def test_empty_rows_give_zero(backend, rng):
    require_kernel(SA, backend)
    # fixed A2 alone: queries 0..2 of block 0 attend to nothing (c = 1, l = 4)
    q, k, v, do = _qkv(rng, (1, 9, 3))
    cfg = {"pattern": "fixed", "stride": 4, "summary": 1, "combine": "interleaved", "layer": 1}
    out, res = SA.fwd(q, k, v, **cfg)
    g = SA.bwd(res, do)
    np.testing.assert_array_equal(out[:, :3], 0)
    assert all(np.isfinite(a).all() for a in (out, *g))
    np.testing.assert_array_equal(g.q[:, :3], 0)


def test_reference_namespaces(xp, rng):
    q, k, v, do = _qkv(rng, (1, 2, 8, 3))
    cfgs = [
        {"pattern": "fixed", "stride": 4, "summary": 2},
        {"pattern": "strided", "stride": 3, "combine": "multihead"},
    ]
    if array_api_compat.is_jax_namespace(xp):
        cfgs = cfgs[:1]  # eager JAX compiles every small op: one pattern keeps the test quick
    for cfg in cfgs:
        out0, res0 = SA.fwd(q, k, v, **cfg)
        g0 = SA.bwd(res0, do)
        with aa.use_backend("array_api"):
            out, res = SA.fwd(*(to_xp(xp, a) for a in (q, k, v)), **cfg)
            g = SA.bwd(res, to_xp(xp, do))
        for a, b in zip((out, *g), (out0, *g0), strict=True):
            assert_close_rel(a, b, 1e-12, floor=1.0)


def test_float32_and_huge_logits(backend, rng):
    require_kernel(SA, backend)
    q, k, v, do = _qkv(rng, (1, 2, 20, 4), dtype=np.float32)
    cfg = {"pattern": "strided", "stride": 4}
    out, res = SA.fwd(q, k, v, **cfg)
    g = SA.bwd(res, do)
    assert out.dtype == np.float32
    assert all(a.dtype == np.float32 for a in g)
    assert_close_rel(out, sdpa_oracle(q, k, v, mask=MASK(20, **cfg))[0], RTOL[np.float32])
    out = SA(q * 100, k * 100, v, **cfg)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=lambda c: "-".join(str(x) for x in c.values()))
def test_float32_backends_agree(cfg, rng):
    require_kernel(SA, "numba")
    q, k, v, do = _qkv(rng, (1, 4, 45, 8), dv=5, dtype=np.float32)
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = SA.fwd(q, k, v, **cfg)
            results[name] = (out, *SA.bwd(res, do))
    mask = _mask_for(45, cfg, 4)
    ref = (sdpa_oracle(q, k, v, mask=mask)[0], *sdpa_oracle_grads(q, k, v, do, mask=mask)[:3])
    for a, b, want in zip(results["array_api"], results["numba"], ref, strict=True):
        assert a.dtype == b.dtype == np.float32
        assert_close_rel(a, want, RTOL[np.float32], floor=1.0)
        assert_close_rel(b, want, RTOL[np.float32], floor=1.0)


def test_numba_deterministic(rng):
    require_kernel(SA, "numba")
    q, k, v, do = _qkv(rng, (1, 2, 300, 8), dtype=np.float32)
    with aa.use_backend("numba"):
        runs = []
        for _ in range(2):
            out, res = SA.fwd(q, k, v, pattern="strided", stride=17)
            runs.append((out, *SA.bwd(res, do)))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_memory_is_linear(rng):
    # L = 8192: one L×L float32 score matrix is 256 MiB, the boolean mask 64 MiB. The op keeps
    # a bounded number of score tiles (the tiled SDPA's element budget) plus O(L·d) copies.
    length = 8192
    q, k, v, do = _qkv(rng, (1, 1, length, 8), dv=8, dtype=np.float32)
    tracemalloc.start()  # traces NumPy's allocations: run the reference
    try:
        with aa.use_backend("array_api"):
            out, res = SA.fwd(q, k, v, pattern="strided", stride=90)
            SA.bwd(res, do)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_read_only_inputs(rng):
    q, k, v, do = _qkv(rng, (1, 2, 9, 3))
    for a in (q, k, v, do):
        a.flags.writeable = False
    out, res = SA.fwd(q, k, v, pattern="fixed", stride=3, summary=1)
    SA.bwd(res, do)


def test_bad_pattern_parameters(rng):
    q, k, v, _ = _qkv(rng, (1, 2, 9, 3))
    with pytest.raises(ValueError, match="pattern"):
        SA(q, k, v, pattern="local", stride=3)
    with pytest.raises(ValueError, match="stride"):
        SA(q, k, v, pattern="strided", stride=0)
    with pytest.raises(TypeError, match="stride"):
        SA(q, k, v, pattern="strided", stride=2.0)
    with pytest.raises(ValueError, match="summary"):
        SA(q, k, v, pattern="fixed", stride=4)
    with pytest.raises(ValueError, match="summary"):
        SA(q, k, v, pattern="fixed", stride=4, summary=5)
    with pytest.raises(ValueError, match="summary"):
        SA(q, k, v, pattern="fixed", stride=4, summary=0)
    with pytest.raises(ValueError, match="summary"):
        SA(q, k, v, pattern="fixed", stride=4, summary=3, combine="multihead")
    with pytest.raises(ValueError, match="summary"):
        SA(q, k, v, pattern="strided", stride=4, summary=2)
    with pytest.raises(ValueError, match="local_width"):
        SA(q, k, v, pattern="fixed", stride=4, summary=2, local_width=3)
    with pytest.raises(ValueError, match="local_width"):
        SA(q, k, v, pattern="strided", stride=4, local_width=0)
    with pytest.raises(ValueError, match="combine"):
        SA(q, k, v, pattern="strided", stride=4, combine="union")
    with pytest.raises(ValueError, match="layer"):
        SA(q, k, v, pattern="strided", stride=4, combine="interleaved", layer=-1)
    with pytest.raises(ValueError, match="q"):
        SA(q[0, 0], k[0, 0], v[0, 0], pattern="strided", stride=4, combine="multihead")
    with pytest.raises(ValueError, match="k"):
        SA(q, k[..., :5, :], v, pattern="strided", stride=4)
    with pytest.raises(ValueError, match="v"):
        SA(q, k, v[..., :5, :], pattern="strided", stride=4)
    with pytest.raises(TypeError, match="k"):
        SA(q, k.astype(np.float32), v, pattern="strided", stride=4)
    with pytest.raises(ValueError, match="num_heads"):
        MASK(9, pattern="strided", stride=3, combine="multihead")
    with pytest.raises(ValueError, match="length"):
        MASK(-1, pattern="strided", stride=3)

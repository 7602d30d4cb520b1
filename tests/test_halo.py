"""HaloNet blocked local attention: dense oracle (timm semantics), SASA equivalence, gradients."""

from __future__ import annotations

import numpy as np
import pytest
from test_neighborhood import _all_grads, dense_oracle

import arrayattn as aa
from arrayattn._gradcheck import directional_errors
from support import assert_close_rel, require_kernel

HALO = aa.halo_attention


def halo_oracle(q, k, v, *, block_size, halo_size, rel_pos=None, scale=None):
    """timm HaloAttn: block I sees rows I·b-h .. I·b+b+h-1 of the zero-padded maps, unmasked."""
    b, h = block_size, halo_size
    d = q.shape[-1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    r_h, r_w = (None, None) if rel_pos is None else rel_pos

    def keys(i):
        return list(range((i // b) * b - h, (i // b) * b + b + h))

    def origin(t):
        return b + h - 1 if t is None or t.shape[-2] == 2 * (b + h) - 1 else b + 3 * h - 1

    oy, ox = origin(r_h), origin(r_w)
    return dense_oracle(
        q,
        k,
        v,
        keys,
        keys,
        scale=scale,
        rel_y=lambda i, n: n - i + oy,
        rel_x=lambda i, n: n - i + ox,
        r_h=r_h,
        r_w=r_w,
    )


def _qkv(rng, shape, dv):
    return (
        rng.standard_normal(shape),
        rng.standard_normal(shape),
        rng.standard_normal(shape[:-1] + (dv,)),
    )


@pytest.mark.parametrize(
    ("b", "h", "hw", "table"),
    [
        (2, 1, (4, 6), "compact"),
        (2, 1, (4, 6), "timm"),
        (3, 2, (6, 3), "compact"),
        (2, 0, (4, 4), "compact"),
        (4, 1, (4, 8), "timm"),
    ],
)
def test_halo_matches_dense_oracle(backend, rng, b, h, hw, table):
    q, k, v = _qkv(rng, (2, 2) + hw + (3,), 4)
    rows = 2 * (b + h) - 1 if table == "compact" else 2 * (b + 2 * h) - 1
    rel = (rng.standard_normal((rows, 3)), rng.standard_normal((2, rows, 3)))
    for extra in ({}, {"rel_pos": rel, "scale": 0.6}):
        out = HALO(q, k, v, block_size=b, halo_size=h, **extra)
        assert_close_rel(out, halo_oracle(q, k, v, block_size=b, halo_size=h, **extra), 1e-12)


def test_halo_block_one_is_sasa_zero_mode(backend, rng):
    """SASA = HaloNet with b = 1: neighbourhood 'zero' mode, K = 2h+1, tables shifted by h rows."""
    h = 2
    kernel = 2 * h + 1
    q, k, v = _qkv(rng, (2, 5, 6, 3), 3)
    r_h, r_w = rng.standard_normal((2 * h + 1, 3)), rng.standard_normal((2 * h + 1, 3))
    pad = np.zeros((h, 3))
    na_rel = {"r_h": np.concatenate([pad, r_h, pad]), "r_w": np.concatenate([pad, r_w, pad])}
    ct = rng.standard_normal(v.shape)
    o1, res1 = HALO.fwd(q, k, v, block_size=1, halo_size=h, rel_pos={"r_h": r_h, "r_w": r_w})
    o2, res2 = aa.neighborhood_attention_2d.fwd(
        q, k, v, kernel_size=kernel, boundary="zero", rel_pos=na_rel
    )
    assert_close_rel(o1, o2, 1e-13)
    g1, g2 = HALO.bwd(res1, ct), aa.neighborhood_attention_2d.bwd(res2, ct)
    for name in "qkv":
        assert_close_rel(getattr(g1, name), getattr(g2, name), 1e-12, name)
    for key in ("r_h", "r_w"):
        assert_close_rel(g1.rel_pos[key], g2.rel_pos[key][h : 3 * h + 1], 1e-12, key)
        np.testing.assert_array_equal(g2.rel_pos[key][:h], 0)


def test_halo_gradients_and_unused_rows(backend, rng):
    b, h = 2, 1
    q, k, v = _qkv(rng, (1, 2, 4, 6, 2), 3)
    rows = 2 * (b + 2 * h) - 1  # timm's table: the first 2h rows are never read
    rel = {"r_h": rng.standard_normal((rows, 2)), "r_w": rng.standard_normal((rows, 2))}
    kw = {"block_size": b, "halo_size": h, "rel_pos": rel}
    errors = directional_errors(HALO, (q, k, v), kw, rng=rng)
    assert max(errors.values()) < 1e-6, errors
    out, res = HALO.fwd(q, k, v, **kw)
    g = HALO.bwd(res, rng.standard_normal(out.shape))
    for key in ("r_h", "r_w"):
        np.testing.assert_array_equal(g.rel_pos[key][: 2 * h], 0)
        assert np.all(np.abs(g.rel_pos[key][2 * h :]).sum(-1) > 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_halo_numba_equals_array_api(rng, dtype):
    require_kernel(HALO, "numba")
    q, k, v = (a.astype(dtype) for a in _qkv(rng, (2, 2, 6, 4, 3), 5))
    rel = {
        "r_h": rng.standard_normal((7, 3)).astype(dtype),
        "r_w": rng.standard_normal((5, 3)).astype(dtype),
    }
    ct = rng.standard_normal(v.shape).astype(dtype)
    got = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = HALO.fwd(q, k, v, block_size=2, halo_size=1, rel_pos=rel)
            got[name] = [out] + _all_grads(HALO.bwd(res, ct))
    rtol = 1e-12 if dtype == np.float64 else 3e-5
    for a, r in zip(got["numba"], got["array_api"], strict=True):
        assert a.dtype == dtype
        assert_close_rel(a, r.astype(np.float64), rtol)


def test_halo_errors(rng):
    q, k, v = _qkv(rng, (2, 6, 8, 3), 3)
    with pytest.raises(ValueError, match="block_size"):
        HALO(q, k, v, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="block_size"):
        HALO(q, k, v, block_size=0, halo_size=1)
    with pytest.raises(ValueError, match="halo_size"):
        HALO(q, k, v, block_size=2, halo_size=-1)
    with pytest.raises(ValueError, match=r"rel_pos\['r_w'\]"):
        HALO(q, k, v, block_size=2, halo_size=1, rel_pos=(np.zeros((5, 3)), np.zeros((6, 3))))
    with pytest.raises(ValueError, match=r"rel_pos\['r_h'\]"):
        HALO(q, k, v, block_size=2, halo_size=1, rel_pos=(np.zeros((5, 2)), None))


_BLOCK_CASES = [
    # (batch, (H, W), b, h, rel): rel = None, ("compact"|"timm", keys, per-head tables)
    ((2, 2), (6, 4), 2, 1, None),
    ((1, 3), (4, 8), 4, 1, ("timm", ("r_h",), False)),
    ((2,), (3, 6), 1, 2, ("compact", ("r_h", "r_w"), False)),  # b = 1: SASA, phase stride 5
    ((2, 2), (4, 6), 2, 3, ("compact", ("r_w",), True)),  # halo wider than the image
    ((3,), (4, 4), 2, 0, ("timm", ("r_h", "r_w"), True)),  # no halo: disjoint windows
    ((1,), (6, 6), 3, 1, ("compact", ("r_h", "r_w"), True)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("batch", "hw", "b", "h", "rel"), _BLOCK_CASES)
def test_halo_block_kernel_equals_array_api(rng, dtype, batch, hw, b, h, rel):
    """The numba block-by-block BLAS kernel against the reference, forward and every gradient."""
    require_kernel(HALO, "numba")
    d, dv = 3, 5
    q, k, v = (a.astype(dtype) for a in _qkv(rng, batch + hw + (d,), dv))
    kw = {"block_size": b, "halo_size": h}
    if rel is not None:
        form, keys, per_head = rel
        rows = 2 * (b + h) - 1 if form == "compact" else 2 * (b + 2 * h) - 1
        lead = batch[-1:] if per_head else ()
        kw["rel_pos"] = {key: rng.standard_normal(lead + (rows, d)).astype(dtype) for key in keys}
    ct = rng.standard_normal(v.shape).astype(dtype)
    got = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = HALO.fwd(q, k, v, **kw)
            got[name] = [out] + _all_grads(HALO.bwd(res, ct))
    assert len(got["numba"]) == len(got["array_api"])
    rtol = 1e-12 if dtype == np.float64 else 3e-5
    for a, r in zip(got["numba"], got["array_api"], strict=True):
        assert a.dtype == dtype
        assert a.shape == r.shape
        assert_close_rel(a, r.astype(np.float64), rtol)


def test_halo_block_kernel_deterministic_and_read_only(rng):
    """Overlapping windows are folded in a fixed order: repeated backwards agree bit for bit."""
    require_kernel(HALO, "numba")
    q, k, v = _qkv(rng, (2, 2, 8, 8, 4), 4)
    rel = (rng.standard_normal((7, 4)), rng.standard_normal((7, 4)))  # 2(b+h)-1 rows
    for a in (q, k, v, *rel):
        a.flags.writeable = False
    copies = [a.copy() for a in (q, k, v, *rel)]
    ct = rng.standard_normal(v.shape)
    with aa.use_backend("numba"):
        runs = []
        for _ in range(3):
            out, res = HALO.fwd(q, k, v, block_size=2, halo_size=2, rel_pos=rel)
            runs.append([out] + _all_grads(HALO.bwd(res, ct)))
    for run in runs[1:]:
        for a, r in zip(run, runs[0], strict=True):
            np.testing.assert_array_equal(a, r)
    for a, c in zip((q, k, v, *rel), copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_halo_block_kernel_empty(rng):
    require_kernel(HALO, "numba")
    q, k, v = _qkv(rng, (0, 4, 4, 3), 2)
    with aa.use_backend("numba"):
        out, res = HALO.fwd(q, k, v, block_size=2, halo_size=1)
        g = HALO.bwd(res, np.ones_like(out))
    assert out.shape == (0, 4, 4, 2)
    assert g.q.shape == q.shape
    assert g.v.shape == v.shape

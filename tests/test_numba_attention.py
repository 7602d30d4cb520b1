"""Kernel-specific tests of the numba SDPA backend (the generic ones are in test_sdpa.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import arrayattn as aa
from arrayattn import _registry
from support import has_kernel

SDPA = aa.scaled_dot_product_attention

pytestmark = pytest.mark.skipif(
    not has_kernel(SDPA, "numba"), reason="numba backend unavailable or without an SDPA kernel"
)


def _ulps(got, ref64, dtype):
    ref = ref64.astype(dtype)
    return np.abs(got.astype(np.float64) - ref64) / np.spacing(np.abs(ref)).astype(np.float64)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi", "max_ulp"), [(np.float32, -126, 127, 2.0), (np.float64, -1022, 1023, 2.0)]
)
def test_exp2_accuracy_in_ulp(dtype, lo, hi, max_ulp):
    from arrayattn.backends.numba._exp import exp2_array

    x = np.concatenate([np.linspace(lo, hi, 400_001), np.linspace(-1, 1, 100_001)]).astype(dtype)
    got = exp2_array(x)
    assert got.dtype == dtype
    assert _ulps(got, np.exp2(x.astype(np.float64)), dtype).max() <= max_ulp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp2_special_values(dtype):
    from arrayattn.backends.numba._exp import exp2_array

    x = np.array([-np.inf, -1e30, -2000.0, 0.0, np.inf, np.nan], dtype=dtype)
    got = exp2_array(x)
    assert got[0] == 0
    assert got[1] == 0
    assert got[2] == 0
    assert not np.signbit(got[:3]).any()
    assert got[3] == 1
    assert got[4] == np.inf
    assert np.isnan(got[5])


@pytest.mark.parametrize(("dtype", "max_ulp"), [(np.float32, 2.0), (np.float64, 2.0)])
def test_tanh_accuracy_in_ulp(dtype, max_ulp):
    from arrayattn.backends.numba._exp import tanh_array

    tiny = np.geomspace(np.finfo(dtype).tiny, 1.0, 20_001)
    x = np.concatenate([np.linspace(-25, 25, 400_001), np.linspace(-1, 1, 100_001), tiny, -tiny])
    x = x.astype(dtype)
    got = tanh_array(x)
    assert got.dtype == dtype
    assert _ulps(got, np.tanh(x.astype(np.float64)), dtype).max() <= max_ulp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_special_values(dtype):
    from arrayattn.backends.numba._exp import tanh_array

    x = np.array([0.0, np.inf, -np.inf, 1e30, -1e30, 30.0, -30.0, np.nan], dtype=dtype)
    got = tanh_array(x)
    np.testing.assert_array_equal(got[:7], [0, 1, -1, 1, -1, 1, -1])
    assert np.isnan(got[7])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_max(dtype):
    from numba import njit

    from arrayattn.backends.numba._exp import row_max

    @njit
    def f(s, init):
        return row_max(s, s.shape[0], init)

    rng = np.random.default_rng(0)
    s = rng.standard_normal(1000).astype(dtype)
    ninf = dtype(-np.inf)
    assert f(s, ninf) == s.max()
    assert f(np.full(7, -np.inf, dtype), ninf) == -np.inf
    assert f(-np.abs(s), dtype(-0.5)) == max(-0.5, (-np.abs(s)).max())
    assert f(s[:0], dtype(3.0)) == 3.0


def _run(backend, q, k, v, do, **kw):
    with aa.use_backend(backend):
        out, res = SDPA.fwd(q, k, v, **kw)
        assert res.backend == backend
        if kw.get("return_lse"):
            g = SDPA.bwd(res, (do, np.ones_like(out[1])))
        else:
            g = SDPA.bwd(res, do)
    return out, g


def _close(a, b, dtype):
    tol = 2e-5 if dtype == np.float32 else 1e-10
    if a is None:
        assert b is None
        return
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    fin = np.isfinite(a)
    np.testing.assert_array_equal(fin, np.isfinite(b))
    np.testing.assert_array_equal(a[~fin], b[~fin])
    scale = max(np.abs(a[fin]).max(initial=0.0), 1.0)
    assert np.abs(a[fin] - b[fin]).max(initial=0.0) <= tol * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blocks", [((7, 5), (3, 11)), ((64, 48), (33, 17)), ((1, 1), (1, 1))])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_tiles_not_dividing_lengths(monkeypatch, dtype, blocks, causal, rng):
    """Tile sizes that divide neither Lq nor Lk, with mask, bias and causal band in play."""
    from arrayattn.backends.numba import attention as nba

    monkeypatch.setattr(nba, "FWD_BLOCKS", blocks[0])
    monkeypatch.setattr(nba, "BWD_BLOCKS", blocks[1])
    lq, lk = 37, 53
    q = rng.standard_normal((2, 2, lq, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, lk, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, lk, 5)).astype(dtype)
    do = rng.standard_normal((2, 2, lq, 5)).astype(dtype)
    mask = rng.random((lq, lk)) > 0.2
    mask[3] = False  # a fully masked row
    mask[10:30, 20:45] = False  # whole tiles masked for the small block sizes
    bias = rng.standard_normal((2, 1, lq, lk)).astype(dtype)
    kw = dict(mask=mask, bias=bias, causal=causal, return_lse=True)
    ref, gref = _run("array_api", q, k, v, do, **kw)
    got, g = _run("numba", q, k, v, do, **kw)
    for a, b in zip(ref, got, strict=True):
        _close(a, b, dtype)
    for name in ("q", "k", "v", "bias"):
        _close(getattr(gref, name), getattr(g, name), dtype)


def test_fully_masked_everything(rng):
    q, k, v = (rng.standard_normal((1, 2, 9, 4)).astype(np.float32) for _ in range(3))
    mask = np.zeros((9, 9), dtype=bool)
    (out, lse), g = _run("numba", q, k, v, np.ones_like(q), mask=mask, return_lse=True)
    assert (out == 0).all()
    assert (lse == np.inf).all()
    for name in ("q", "k", "v"):
        assert (getattr(g, name) == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_length_one(dtype, rng):
    q, k, v = (rng.standard_normal((3, 1, 4)).astype(dtype) for _ in range(3))
    do = rng.standard_normal((3, 1, 4)).astype(dtype)
    (out, lse), g = _run("numba", q, k, v, do, return_lse=True)
    np.testing.assert_allclose(out, v, rtol=1e-6)  # one key: the output is its value
    np.testing.assert_allclose(g.v, do, rtol=1e-6)
    ref, gref = _run("array_api", q, k, v, do, return_lse=True)
    for a, b in zip(ref, (out, lse), strict=True):
        _close(a, b, dtype)


@pytest.mark.parametrize(("heads", "length"), [(3, 300), (1, 700)])
def test_deterministic_bitwise(heads, length, rng):
    """Two runs bitwise equal, also when the backward splits key tiles into dQ chunks (H=1)."""
    q, k, v, do = (rng.standard_normal((1, heads, length, 16)).astype(np.float32) for _ in range(4))
    bias = rng.standard_normal((length, length)).astype(np.float32)
    runs = [_run("numba", q, k, v, do, bias=bias, causal=True) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for name in ("q", "k", "v", "bias"):
        np.testing.assert_array_equal(getattr(runs[0][1], name), getattr(runs[1][1], name))


def test_auto_picks_numba_for_numpy_float(rng):
    q = rng.standard_normal((2, 5, 4)).astype(np.float32)
    _, res = SDPA.fwd(q, q, q)
    assert res.backend == "numba"
    _, res16 = SDPA.fwd(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16))
    assert res16.backend == "array_api"
    with aa.use_backend("numba"), pytest.raises(aa.BackendError, match="float16"):
        SDPA(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16))


def test_numba_unavailable_falls_back(monkeypatch, rng):
    """Without numba, auto uses array_api and numba reports why it is unavailable."""
    reason = "numba cannot be imported (simulated); install the 'numba' extra"
    specs = _registry._specs()
    monkeypatch.setitem(specs, "numba", dataclasses.replace(specs["numba"], probe=lambda: reason))
    _registry._unavailable.cache_clear()
    try:
        q = rng.standard_normal((2, 5, 4)).astype(np.float32)
        _, res = SDPA.fwd(q, q, q)
        assert res.backend == "array_api"
        info = {b.name: b for b in aa.backends()}["numba"]
        assert not info.available
        assert info.reason == reason
        with aa.use_backend("numba"), pytest.raises(aa.BackendError, match="simulated"):
            SDPA(q, q, q)
    finally:
        monkeypatch.undo()
        _registry._unavailable.cache_clear()


@pytest.mark.parametrize("layer", ["default", "omp", "workqueue"])
def test_no_blas_threading_warning(layer, tmp_path):
    """No OpenBLAS 'Detect OpenMP Loop' (or any other) message on stderr, and BLAS threads
    restored after the call, whatever Numba threading layer runs the kernels."""
    code = (
        "import numpy as np, arrayattn as aa, threadpoolctl\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v, do = (rng.standard_normal((1, 2, 600, 32), dtype=np.float32) for _ in range(4))\n"
        "def blas():\n"
        "    return {i['filepath']: i['num_threads'] for i in threadpoolctl.threadpool_info()}\n"
        "before = blas()\n"
        "out, res = aa.scaled_dot_product_attention.fwd(q, k, v, causal=True)\n"
        "assert res.backend == 'numba'\n"
        "aa.scaled_dot_product_attention.bwd(res, do)\n"
        "after = blas()\n"
        "assert all(after[f] == n for f, n in before.items()), (before, after)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", NUMBA_NUM_THREADS="2")
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "OpenMP" not in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr

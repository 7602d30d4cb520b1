"""GPU backends: NVRTC compile checks of every .cu source (no device needed), and on a CUDA
device the ``cupy`` and ``numba_cuda`` backends against ``array_api`` on CuPy inputs (``gpu``).

The compile checks need ``cuda-bindings``, the NVRTC library (``nvidia-cuda-nvrtc``) and the CUDA
headers (``nvidia-cuda-runtime``, ``nvidia-cuda-crt``); they are skipped, with the reason, where
these are absent. The ``gpu`` tests are skipped without a CUDA device.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import arrayattn as aa

ARCHS = ("sm_80", "sm_90")
#: .cu source -> the launcher module declaring its template instantiations
SOURCES = {
    "attention.cu": "attention",
    "criss_cross.cu": "criss_cross",
    "neighborhood.cu": "neighborhood",
}


def _nvrtc_reason():
    try:
        from cuda.bindings import nvrtc
    except Exception as exc:
        return f"cuda-bindings is not installed ({exc})"
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:
        return f"the NVRTC library cannot be loaded ({exc}); install nvidia-cuda-nvrtc"
    try:
        from arrayattn.backends.cupy._module import _include_dir

        _include_dir()
    except Exception as exc:
        return f"the CUDA headers were not found ({exc}); install nvidia-cuda-runtime"
    return None


def test_every_source_is_listed():
    from arrayattn.backends.cupy import _module

    assert set(_module.sources()) == set(SOURCES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_cu_compiles_with_nvrtc(source, arch):
    reason = _nvrtc_reason()
    if reason:
        pytest.skip(reason)
    from arrayattn.backends.cupy import _module

    launcher = importlib.import_module(f"arrayattn.backends.cupy.{SOURCES[source]}")
    cubin = _module.nvrtc_compile(source, arch, launcher.NAME_EXPRESSIONS)
    assert cubin[:4] == b"\x7fELF"


# -- on a CUDA device -----------------------------------------------------------------------------


def _cupy():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    try:
        if not cupy.cuda.is_available():
            pytest.skip("no CUDA device visible")
    except Exception as exc:
        pytest.skip(f"no CUDA driver ({exc})")
    return cupy


GPU_BACKENDS = ("cupy", "numba_cuda")
TOL = {"float64": 1e-10, "float32": 2e-5}


def _sdpa_case(rng, dtype):
    q = rng.standard_normal((2, 4, 150, 64))
    k = rng.standard_normal((2, 2, 170, 64))
    v = rng.standard_normal((2, 2, 170, 48))
    mask = rng.random((1, 1, 150, 170)) > 0.2
    mask[..., 3, :] = False
    bias = rng.standard_normal((4, 150, 170))
    return (q, k, v), {
        "mask": mask,
        "bias": bias,
        "enable_gqa": True,
        "causal": "bottom_right",
        "return_lse": True,
    }


def _cc_case(rng, dtype):
    return (
        rng.standard_normal((2, 9, 11, 16)),
        rng.standard_normal((2, 9, 11, 16)),
        rng.standard_normal((2, 9, 11, 8)),
    ), {"scale": 0.3}


def _na_case(rng, dtype):
    # 2 x 3 heads, 13 x 17 image, K = 5, dilation 2, zero padding, per-head bias, shared r_h / r_w
    q, k = rng.standard_normal((2, 3, 13, 17, 16)), rng.standard_normal((2, 3, 13, 17, 16))
    v = rng.standard_normal((2, 3, 13, 17, 24))
    rel = {"r_h": rng.standard_normal((9, 16)) / 4, "r_w": rng.standard_normal((9, 16)) / 4}
    return (q, k, v), {
        "kernel_size": 5,
        "dilation": 2,
        "boundary": "zero",
        "rel_bias": rng.standard_normal((3, 9, 9)),
        "rel_pos": rel,
    }


CASES = {"scaled_dot_product_attention": _sdpa_case, "criss_cross_attention": _cc_case}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op_name", sorted(CASES))
def test_gpu_backend_matches_array_api(rng, op_name, backend, dtype):
    cupy = _cupy()
    info = {b.name: b for b in aa.backends()}[backend]
    if not info.available:
        pytest.skip(f"backend {backend} unavailable: {info.reason}")
    op = getattr(aa, op_name)
    args, kwargs = CASES[op_name](rng, dtype)
    if backend == "numba_cuda" and dtype == "float16":
        pytest.skip(
            "numba_cuda kernels take float32/float64 (half precision is the cupy backend's)"
        )

    def dev(a, dt):
        if a is None or a.dtype == bool:
            return None if a is None else cupy.asarray(a)
        return cupy.asarray(a.astype(dt))

    x = [dev(a, dtype) for a in args]
    kw = {k_: (dev(a, dtype) if isinstance(a, np.ndarray) else a) for k_, a in kwargs.items()}
    with aa.use_backend(backend):
        outs, res = op.fwd(*x, **kw)
    assert res.backend == backend
    outs = outs if isinstance(outs, tuple) else (outs,)
    cts = tuple(cupy.asarray(rng.standard_normal(o.shape).astype(o.dtype)) for o in outs)
    g = op.bwd(res, cts if len(cts) > 1 else cts[0])
    # reference: float64 array_api on the same values
    with aa.use_backend("array_api"):
        r_outs, r_res = op.fwd(
            *[a.astype("float64") for a in x],
            **{
                k_: (a.astype("float64") if hasattr(a, "dtype") and a.dtype != bool else a)
                for k_, a in kw.items()
            },
        )
        r_outs = r_outs if isinstance(r_outs, tuple) else (r_outs,)
        rg = op.bwd(
            r_res,
            tuple(c.astype("float64") for c in cts) if len(cts) > 1 else cts[0].astype("float64"),
        )
    if dtype == "float16":
        _check_half(cupy, op, x, kw, outs, g, r_outs, rg, cts)
        return
    tol = TOL[dtype]
    for o, r in zip(outs, r_outs, strict=True):
        o64, r64 = cupy.asnumpy(o).astype(np.float64), cupy.asnumpy(r)
        fin = np.isfinite(r64)
        assert np.array_equal(fin, np.isfinite(o64))
        np.testing.assert_allclose(
            o64[fin], r64[fin], rtol=0, atol=tol * max(1, np.abs(r64[fin]).max())
        )
    for name in op.differentiable:
        a, b = getattr(g, name), getattr(rg, name)
        if b is None:
            assert a is None
            continue
        a64, b64 = cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b)
        np.testing.assert_allclose(a64, b64, rtol=0, atol=tol * max(1, np.abs(b64).max()))
    g2 = op.bwd(res, cts if len(cts) > 1 else cts[0])  # deterministic
    for name in op.differentiable:
        if getattr(g, name) is not None:
            assert bool(cupy.all(getattr(g, name) == getattr(g2, name)))


def _check_half(cupy, op, x, kw, outs, g, r_outs, rg, cts):
    """FlashAttention's criterion, outputs and gradients: the error against the float64 result is
    at most twice that of the array_api reference run on the same float16 inputs (+ eps)."""
    with aa.use_backend("array_api"):
        n_outs, n_res = op.fwd(*x, **kw)
        n_outs = n_outs if isinstance(n_outs, tuple) else (n_outs,)
        ng = op.bwd(n_res, cts if len(cts) > 1 else cts[0])

    def err(a, ref):
        return float(
            cupy.max(cupy.abs(cupy.nan_to_num(a.astype("float64") - ref, posinf=0, neginf=0)))
        )

    for o, r, n in zip(outs, r_outs, n_outs, strict=True):
        assert err(o, r) <= 2 * err(n, r) + 1e-3
    for name in op.differentiable:
        for a, b, n in zip(
            _leaves(getattr(g, name)),
            _leaves(getattr(rg, name)),
            _leaves(getattr(ng, name)),
            strict=False,
        ):
            scale = max(1.0, float(cupy.max(cupy.abs(b))))
            assert err(a, b) <= 2 * err(n, b) + 1e-3 * scale, name


@pytest.mark.gpu
@pytest.mark.parametrize(("d", "dv"), [(32, 32), (64, 48), (128, 128), (160, 64)])
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_gpu_sdpa_half_widths(rng, d, dv, causal):
    """float16 SDPA forward and backward at each padded width of the tensor-core kernels (32, 64,
    128) and beyond them (160: CUDA cores), lengths that leave partial tiles."""
    cupy = _cupy()
    x = [
        cupy.asarray(rng.standard_normal(shape).astype("float16"))
        for shape in ((2, 3, 77, d), (2, 3, 93, d), (2, 3, 93, dv))
    ]
    op = aa.scaled_dot_product_attention
    with aa.use_backend("cupy"):
        outs, res = op.fwd(*x, causal=causal)
    cts = (cupy.asarray(rng.standard_normal(outs.shape).astype("float16")),)
    g = op.bwd(res, cts[0])
    with aa.use_backend("array_api"):
        r_outs, r_res = op.fwd(*[a.astype("float64") for a in x], causal=causal)
        rg = op.bwd(r_res, cts[0].astype("float64"))
    _check_half(cupy, op, x, {"causal": causal}, (outs,), g, (r_outs,), rg, cts)


def _leaves(tree):
    """The arrays of a gradient entry (an array, a tuple or a dict of arrays, or None)."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [tree[key] for key in sorted(tree)]
    if isinstance(tree, (tuple, list)):
        return list(tree)
    return [tree]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op_name", ["neighborhood_attention_2d", "halo_attention"])
def test_gpu_neighborhood_matches_array_api(rng, op_name, backend, dtype):
    """The local-attention kernels (rel_pos is a mapping, so it has its own comparison)."""
    cupy = _cupy()
    info = {b.name: b for b in aa.backends()}[backend]
    if not info.available:
        pytest.skip(f"backend {backend} unavailable: {info.reason}")
    if backend == "numba_cuda" and dtype == "float16":
        pytest.skip(
            "numba_cuda kernels take float32/float64 (half precision is the cupy backend's)"
        )
    op = getattr(aa, op_name)
    if op_name == "halo_attention":  # 4x4 blocks, halo 2, timm's 2(b+2h)-1 = 15-row tables
        args, kwargs = _na_case(rng, dtype)[0], {"block_size": 4, "halo_size": 2}
        args = tuple(a[..., :12, :16, :] for a in args)
        kwargs["rel_pos"] = {
            "r_h": rng.standard_normal((15, 16)) / 4,
            "r_w": rng.standard_normal((15, 16)) / 4,
        }
    else:
        args, kwargs = _na_case(rng, dtype)

    def on_dev(a, dt):
        if isinstance(a, dict):
            return {key: on_dev(t, dt) for key, t in a.items()}
        return cupy.asarray(a.astype(dt)) if isinstance(a, np.ndarray) else a

    x = [on_dev(a, dtype) for a in args]
    kw = {key: on_dev(a, dtype) for key, a in kwargs.items()}
    x64 = [on_dev(a, "float64") for a in args]
    kw64 = {key: on_dev(a, "float64") for key, a in kwargs.items()}
    with aa.use_backend(backend):
        out, res = op.fwd(*x, **kw)
    assert res.backend == backend
    assert out.dtype == x[0].dtype
    ct = cupy.asarray(rng.standard_normal(out.shape).astype(dtype))
    g = op.bwd(res, ct)
    with aa.use_backend("array_api"):
        r_out, r_res = op.fwd(*x64, **kw64)
        rg = op.bwd(r_res, ct.astype("float64"))
    if dtype == "float16":
        with aa.use_backend("array_api"):
            n_out = op(*x, **kw)
        err = float(cupy.max(cupy.abs(out.astype("float64") - r_out)))
        nerr = float(cupy.max(cupy.abs(n_out.astype("float64") - r_out)))
        assert err <= 2 * nerr + 1e-3
        return
    tol = TOL[dtype]

    def close(a, b):
        a64, b64 = cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b)
        np.testing.assert_allclose(a64, b64, rtol=0, atol=tol * max(1, np.abs(b64).max()))

    close(out, r_out)
    for name in op.differentiable:
        got, want = _leaves(getattr(g, name)), _leaves(getattr(rg, name))
        assert len(got) == len(want), name
        for a, b in zip(got, want, strict=True):
            close(a, b)
    g2 = op.bwd(res, ct)  # deterministic
    for name in op.differentiable:
        for a, b in zip(_leaves(getattr(g, name)), _leaves(getattr(g2, name)), strict=True):
            assert bool(cupy.all(a == b))

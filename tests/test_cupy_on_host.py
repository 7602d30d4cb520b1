"""The ``cupy`` backend's CUDA kernels, run on a CPU.

Each ``backends/cupy/*.cu`` source is compiled as host C++ with ``tests/host_cuda/shim.h`` (one
thread per CUDA thread, blocks in turn, real barriers for ``__syncthreads``/``__syncwarp``,
``__shfl_xor_sync`` between warp barriers, shared memory filled with NaN and guarded by a canary,
wmma fragments held whole by lane 0 of each warp, a wmma store visible only from lane 0's next
barrier) together with a table of every template instantiation its launcher lists. The ops then
run through the backend's real adapters and launchers, with NumPy standing in for CuPy and each
launch executed by that library, and are compared with the array-API reference.

This checks the kernels' indexing, tiling, masking, synchronisation, shared-memory layout and
sizes, argument lists and numerics without a GPU; fake devices check which device the launchers
use, and NVRTC's ptxas report that no instantiation uses local memory. It cannot check the CUDA
compiler's code (the NVRTC tests in ``test_gpu.py`` check that it compiles), the hardware's wmma
fragment layouts, races the barriers of the emulation would hide, or speed. Skipped where no
C++20 compiler is available.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

import arrayattn as aa

HERE = os.path.dirname(__file__)
CUPY_DIR = os.path.join(os.path.dirname(HERE), "backends", "cupy")
FAMILIES = ("attention", "criss_cross", "neighborhood")


def _registry_source(family, exprs, path=None):
    lines = [
        '#include "shim.h"',
        f'#include "{path or os.path.join(CUPY_DIR, family + ".cu")}"',
        "",
        'extern "C" int run_kernel(const char* expr, int nargs, const uint64_t* slots, int grid,',
        "                          int block, size_t shared) {",
        "    const std::string e(expr);",
    ]
    for expr in exprs:
        lines.append(
            f'    if (e == "{expr}") return run(&{expr}, nargs, slots, grid, block, shared);'
        )
    lines += ["    return -4;  // not in the launcher's list", "}", ""]
    return "\n".join(lines)


def _thread_limit():
    """The soft limit on this user's processes and threads; None where unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _compiler(out):
    """The C++ compiler, after checking the emulation can run here; writes the empty CUDA headers
    (shim.h provides what they would) into ``out``."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or $CXX)")
    limit = _thread_limit()
    if limit is not None and limit < 4096:
        # a block runs as up to 256 host threads; failing to start one would deadlock the rest
        pytest.skip(f"the process limit ({limit}) leaves too few threads for the emulation")
    for header in ("cuda_fp16.h", "cuda_bf16.h", "mma.h"):
        (out / header).write_text("")
    return cxx


def _start_build(cxx, out, src, lib):
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-shared",
        "-pthread",
        f"-I{out}",
        f"-I{os.path.join(HERE, 'host_cuda')}",
        str(src),
        "-o",
        str(lib),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_build(proc, what, lib):
    _, err = proc.communicate()
    if proc.returncode:
        if "barrier" in err or "_Float16" in err or "c++20" in err or "bit_cast" in err:
            pytest.skip(f"the C++ compiler lacks C++20 <barrier>, <bit> or _Float16: {err[:300]}")
        pytest.fail(f"{what} does not compile as host C++:\n{err}")
    handle = ctypes.CDLL(str(lib))
    handle.run_kernel.restype = ctypes.c_int
    return handle


@pytest.fixture(scope="module")
def host_libs(tmp_path_factory):
    """One host library per .cu source (compiled in parallel)."""
    out = tmp_path_factory.mktemp("host_cuda")
    cxx = _compiler(out)
    procs = {}
    for family in FAMILIES:
        launcher = importlib.import_module(f"arrayattn.backends.cupy.{family}")
        src = out / f"{family}.cpp"
        src.write_text(_registry_source(family, launcher.NAME_EXPRESSIONS))
        procs[family] = _start_build(cxx, out, src, out / f"{family}.so")
    return {
        family: _finish_build(proc, f"{family}.cu", out / f"{family}.so")
        for family, proc in procs.items()
    }


def _slot(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "kernels read raw pointers: arguments must be C-contiguous"
        return a.ctypes.data
    if isinstance(a, (float, np.floating)):
        return struct.unpack("<Q", struct.pack("<d", float(a)))[0]
    return int(a) & 0xFFFFFFFFFFFFFFFF


class _HostKernel:
    """Stands in for a ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=...)``."""

    def __init__(self, lib, expr):
        self.lib, self.expr = lib, expr

    def __call__(self, grid, block, args, shared_mem=0):
        slots = (ctypes.c_uint64 * len(args))(*map(_slot, args))
        rc = self.lib.run_kernel(
            self.expr.encode(), len(args), slots, int(grid[0]), int(block[0]), int(shared_mem)
        )
        reasons = {
            -1: "launch refused (shared memory or block size)",
            -2: "wrote past its shared memory",
            -4: "not in NAME_EXPRESSIONS",
            -5: "argument count differs from the kernel's",
        }
        assert rc == 0, f"{self.expr}: {reasons.get(rc, rc)}"
        LAUNCHED.append(self.expr)


LAUNCHED: list[str] = []


@pytest.fixture
def host_cupy(host_libs, monkeypatch):
    """Run ops on the ``cupy`` backend's kernels with NumPy arrays, every launch on the host."""
    monkeypatch.setitem(sys.modules, "cupy", np)
    from arrayattn import _registry
    from arrayattn.backends import cupy as backend

    for family in FAMILIES:
        module = importlib.import_module(f"arrayattn.backends.cupy.{family}")
        lib = host_libs[family]
        monkeypatch.setattr(
            module, "function", lambda name, exprs, expr, shared=0, lib=lib: _HostKernel(lib, expr)
        )
    monkeypatch.setattr(backend._module, "current_device", lambda: (90, 227 * 1024))  # an H100
    resolve, kernel_for = _registry.resolve, _registry.kernel_for
    ops = aa.registered_ops()
    kernels = {
        name: ops[name].adapt(kernel) for name, kernel in _registry._backend_kernels("cupy").items()
    }

    def host_resolve(op, call, setting):  # "array_api" stays the reference; any other: cupy
        if setting == "array_api":
            return resolve(op, call, setting)
        return "cupy", kernels[op.name]

    monkeypatch.setattr(_registry, "resolve", host_resolve)
    monkeypatch.setattr(
        _registry,
        "kernel_for",
        lambda op, name: kernels[op.name] if name == "cupy" else kernel_for(op, name),
    )
    LAUNCHED.clear()
    return LAUNCHED


# -- comparisons ----------------------------------------------------------------------------------


def _leaves(tree):
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [tree[key] for key in sorted(tree)]
    return list(tree) if isinstance(tree, (tuple, list)) else [tree]


def _max_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    assert np.array_equal(fin, np.isfinite(a)), "the non-finite entries differ"
    return float(np.max(np.abs(a[fin] - ref[fin]), initial=0.0))


def _run(op, args, kwargs, cts):
    outs, res = op.fwd(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, op.bwd(res, cts if len(cts) > 1 else cts[0])


def _compare(op, args, kwargs, dtype, rng, half_criterion=False):
    """The cupy kernels (on the host) against array_api in float64 (and, for half precision,
    FlashAttention's criterion: at most twice the error of array_api on the same inputs)."""

    def cast(x, dt):
        if isinstance(x, dict):
            return {key: cast(a, dt) for key, a in x.items()}
        return x if x is None or not hasattr(x, "dtype") or x.dtype == bool else x.astype(dt)

    x = [cast(a, dtype) for a in args]
    kw = {k: cast(a, dtype) for k, a in kwargs.items()}
    with aa.use_backend("array_api"):
        outs0 = op(*x, **kw)
    outs0 = outs0 if isinstance(outs0, tuple) else (outs0,)
    cts = tuple(rng.standard_normal(o.shape).astype(o.dtype) for o in outs0)
    LAUNCHED.clear()
    ours = _run(op, x, kw, cts)
    launched = list(LAUNCHED)
    assert launched, "nothing ran on the host kernels"
    with aa.use_backend("array_api"):
        ref = _run(
            op,
            [cast(a, np.float64) for a in x],
            {k: cast(a, np.float64) for k, a in kw.items()},
            tuple(c.astype(np.float64) for c in cts),
        )
        base = _run(op, x, kw, cts) if half_criterion else None
    assert LAUNCHED == launched, "the reference ran on the host kernels"
    LAUNCHED[:] = launched  # what the test may inspect: the kernels of the cupy run
    pairs = list(zip(ours[0], ref[0], base[0] if base else ref[0], strict=True))
    for name in op.differentiable:
        pairs += list(
            zip(
                _leaves(getattr(ours[1], name)),
                _leaves(getattr(ref[1], name)),
                _leaves(getattr(base[1], name)) if base else _leaves(getattr(ref[1], name)),
                strict=False,
            )
        )
    tol = {np.float64: 1e-10, np.float32: 2e-5}.get(np.dtype(dtype).type)
    for got, want, baseline in pairs:
        scale = max(
            1.0, float(np.max(np.abs(np.asarray(want, np.float64)[np.isfinite(want)]), initial=0.0))
        )
        if half_criterion:
            assert _max_err(got, want) <= 2 * _max_err(baseline, want) + 1e-3 * scale
        else:
            assert _max_err(got, want) <= tol * scale


# -- scaled dot-product attention ------------------------------------------------------------------


def _sdpa_everything(rng):
    q, k = rng.standard_normal((2, 4, 70, 64)), rng.standard_normal((2, 2, 90, 64))
    v = rng.standard_normal((2, 2, 90, 48))
    mask = rng.random((1, 1, 70, 90)) > 0.2
    mask[..., 3, :] = False  # a fully masked row
    # The bias broadcasts over query rows: its gradient sums over them.
    return (q, k, v), {
        "mask": mask,
        "bias": rng.standard_normal((4, 1, 90)),
        "enable_gqa": True,
        "causal": "bottom_right",
        "return_lse": True,
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_sdpa_every_option(host_cupy, rng, dtype):
    """Mask (with a fully masked row), bias and its gradient, GQA, causal, lse, partial tiles;
    float16 on the tensor-core kernels, float32/float64 on the CUDA-core ones."""
    args, kwargs = _sdpa_everything(rng)
    _compare(
        aa.scaled_dot_product_attention,
        args,
        kwargs,
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )
    wmma = [e for e in host_cupy if "_wmma<" in e]
    assert bool(wmma) == (dtype == np.float16), host_cupy


@pytest.mark.parametrize(("d", "dv"), [(32, 32), (64, 64), (128, 128), (16, 100), (160, 64)])
@pytest.mark.parametrize("causal", [False, "top_left"])
def test_sdpa_half_widths(host_cupy, rng, d, dv, causal):
    """float16 at each padded width of the tensor-core kernels, and past them (160: CUDA cores)."""
    args = (
        rng.standard_normal((1, 2, 77, d)),
        rng.standard_normal((1, 2, 93, d)),
        rng.standard_normal((1, 2, 93, dv)),
    )
    _compare(
        aa.scaled_dot_product_attention,
        args,
        {"causal": causal},
        np.float16,
        rng,
        half_criterion=True,
    )
    assert any("_wmma<" in e for e in host_cupy) == (max(d, dv) <= 128)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("d", "dv"), [(16, 8), (200, 72)])
def test_sdpa_cuda_cores_widths(host_cupy, rng, dtype, d, dv):
    args = (
        rng.standard_normal((3, 40, d)),
        rng.standard_normal((3, 70, d)),
        rng.standard_normal((3, 70, dv)),
    )
    _compare(aa.scaled_dot_product_attention, args, {"causal": "top_left"}, dtype, rng)


def test_sdpa_bfloat16_tensor_cores(host_cupy, rng):
    """bfloat16 (NumPy through ml_dtypes) on the tensor-core kernels, launcher level."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from arrayattn.backends.cupy import attention as launcher

    bf = ml_dtypes.bfloat16
    q, k = rng.standard_normal((4, 77, 64)).astype(bf), rng.standard_normal((2, 93, 64)).astype(bf)
    v, do = rng.standard_normal((2, 93, 48)).astype(bf), rng.standard_normal((4, 77, 48)).astype(bf)
    scale = 0.125
    out, lse = launcher.sdpa_forward(q, k, v, causal="top_left", scale=scale, gqa_groups=2)
    dq, dk, dv, _ = launcher.sdpa_backward(
        q, k, v, out, lse, do, causal="top_left", scale=scale, gqa_groups=2
    )
    assert all("_wmma<__nv_bfloat16" in e for e in host_cupy if "delta" not in e)
    opts = {"causal": "top_left", "enable_gqa": True, "scale": scale, "return_lse": True}
    results = {}
    for dt in (np.float64, np.float32):
        with aa.use_backend("array_api"):
            (o, l_), res = aa.scaled_dot_product_attention.fwd(
                q.astype(dt), k.astype(dt), v.astype(dt), **opts
            )
            g = aa.scaled_dot_product_attention.bwd(res, (do.astype(dt), np.zeros_like(l_)))
        results[dt] = (o, l_, g.q, g.k, g.v)
    for got, want, f32 in zip(
        (out, lse, dq, dk, dv), results[np.float64], results[np.float32], strict=True
    ):
        baseline = _max_err(f32 if f32.shape == lse.shape else f32.astype(bf), want)
        assert _max_err(got, want) <= 2 * baseline + 1e-3 * max(1.0, float(np.max(np.abs(want))))


def _minus_inf_rows(rng, lq, lk):
    """A mask and a bias whose rows start with -inf logits (the running max is -inf when the
    first finite logit arrives), are -inf throughout, or are fully masked."""
    mask = np.ones((lq, lk), bool)
    bias = rng.standard_normal((lq, lk))
    bias[0, :40] = -np.inf  # past the first key tile of every kernel
    bias[1, :] = -np.inf  # nothing to attend to: output 0, lse +inf, zero gradients
    bias[2, 1::2] = -np.inf
    mask[3, :] = False
    mask[4, :35] = False
    bias[4, 35:37] = -np.inf
    return mask, bias


@pytest.mark.parametrize(
    ("dtype", "d"), [(np.float64, 32), (np.float32, 32), (np.float16, 32), (np.float16, 160)]
)
def test_sdpa_minus_inf_rows(host_cupy, rng, dtype, d):
    """Finding 1 for the SDPA kernels (float16 at d = 160 on CUDA cores): -inf bias entries and
    masked rows give the reference's finite outputs, +inf lse for an empty row, and finite
    gradients (the m_use guard)."""
    lq, lk = 70, 90
    mask, bias = _minus_inf_rows(rng, lq, lk)
    args = (
        rng.standard_normal((2, lq, d)),
        rng.standard_normal((2, lk, d)),
        rng.standard_normal((2, lk, 24)),
    )
    kwargs = {"mask": mask, "bias": bias, "return_lse": True}
    _compare(
        aa.scaled_dot_product_attention,
        args,
        kwargs,
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )
    assert any("_wmma<" in e for e in host_cupy) == (dtype == np.float16 and d <= 128)


@pytest.mark.parametrize("boundary", ["clamp", "zero"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_neighborhood_minus_inf_rel_bias(host_cupy, rng, dtype, boundary):
    """Finding 1: a -inf relative-bias entry read by a query's first slots made the online
    softmax compute exp(-inf + inf) = NaN; head 1 reads only -inf (nothing to attend to)."""
    shape = (1, 2, 9, 10, 8)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    rel_bias = rng.standard_normal((2, 5, 5))
    rel_bias[0, 0, :] = -np.inf
    rel_bias[0, 1:, 0] = -np.inf
    rel_bias[1] = -np.inf
    kwargs = {"kernel_size": 3, "boundary": boundary, "rel_bias": rel_bias}
    _compare(
        aa.neighborhood_attention_2d,
        (q, k, v),
        kwargs,
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )


def _half_dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name).type


def _half_ok(got, want, base, what, per="all"):
    """FlashAttention's criterion, max|got - ref64| <= 2 max|naive - ref64| + 1e-3 scale, over
    the whole array, per ``"row"`` (the last axis) or per ``"element"``: an lse of -1e5 does not
    loosen the tolerance of the other rows."""
    got, want, base = (np.asarray(a, np.float64) for a in (got, want, base))
    assert np.array_equal(np.isfinite(got), np.isfinite(want)), f"{what}: non-finite entries differ"
    fin = np.isfinite(want)
    z = np.zeros_like(want)
    err, berr, mag = (np.abs(np.where(fin, a, z)) for a in (got - want, base - want, want))
    shape = {"all": (1, -1), "row": (-1, want.shape[-1]), "element": (-1, 1)}[per]
    err, berr, mag = (a.reshape(shape) for a in (err, berr, mag))
    lim = 2 * berr.max(-1) + 1e-3 * np.maximum(1.0, mag.max(-1))
    bad = np.nonzero(err.max(-1) > lim)[0]
    assert not bad.size, f"{what}: {per}s {bad}: error {err.max(-1)[bad]}, limit {lim[bad]}"


def _float32_bias(rng, lq, lk):
    """A float32 bias that float16/bfloat16 cannot carry: a row of -1e5 (-inf in float16: the
    row would look empty) and rows of 300 + 0.3 j, 1000 + a ramp (the steps round away)."""
    bias = rng.standard_normal((lq, lk)).astype(np.float32)
    bias[0] = -1e5
    bias[1] = 300 + 0.3 * np.arange(lk)
    bias[2] = 1000 + np.linspace(0, 3, lk)
    return bias


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 160])  # tensor cores, then CUDA cores with float32 accumulation
def test_sdpa_float32_bias_with_half_inputs(host_cupy, rng, half, d):
    """Finding 2: a float32 bias with float16/bfloat16 q, k, v is added in float32 (as the
    reference does), not rounded to q's dtype first; outputs, lse and every gradient by
    FlashAttention's criterion against the float64 reference."""
    from arrayattn._reference.attention import sdpa_backward, sdpa_forward
    from arrayattn.backends.cupy import attention as launcher

    dt = _half_dtype(half)
    lq, lk, dv, scale = 40, 70, 24, 0.125
    q = rng.standard_normal((2, lq, d)).astype(dt)
    k = rng.standard_normal((2, lk, d)).astype(dt)
    v = rng.standard_normal((2, lk, dv)).astype(dt)
    bias = _float32_bias(rng, lq, lk)
    do = rng.standard_normal((2, lq, dv)).astype(dt)
    dlse = rng.standard_normal((2, lq)).astype(np.float32)
    kw = {"bias": bias, "scale": scale}
    out, lse = launcher.sdpa_forward(q, k, v, **kw)
    grads = launcher.sdpa_backward(q, k, v, out, lse, do, dlse, **kw)
    assert any("_wmma<" in e for e in host_cupy) == (d <= 128)
    assert grads[3].dtype == np.float32

    def reference(cdt, round_to=None):
        x = [a.astype(cdt) for a in (q, k, v)]
        o, l_ = sdpa_forward(np, *x, bias=bias.astype(cdt), scale=scale)
        if round_to is not None:  # the naive computation returns its output in q's dtype
            o = o.astype(round_to).astype(cdt)
        g = sdpa_backward(
            np, *x, o, l_, do.astype(cdt), dlse.astype(cdt), bias=bias.astype(cdt), scale=scale
        )
        if round_to is not None:
            g = tuple(a.astype(round_to) for a in g[:3]) + (g[3],)
        return (o, l_, *g)

    want, base = reference(np.float64), reference(np.float32, dt)
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, g, w, b in zip(names, (out, lse, *grads), want, base, strict=True):
        _half_ok(g, w, b, name, per={"lse": "element", "dbias": "row"}.get(name, "all"))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_neighborhood_float32_tables_with_half_inputs(host_cupy, rng, half):
    """Finding 2 for the window kernels: float32 rel_bias, r_h and r_w with float16/bfloat16
    maps are read in float32 (the launcher contract allows tables of any float dtype)."""
    from arrayattn._reference.neighborhood import (
        na_axis_windows,
        window_attention_backward,
        window_attention_forward,
    )
    from arrayattn.backends.cupy import neighborhood as launcher

    dt = _half_dtype(half)
    kern, h, w, d, dv = 3, 6, 7, 8, 4
    wy, wx = na_axis_windows(h, kern, 1, "zero"), na_axis_windows(w, kern, 1, "zero")
    q, k = (rng.standard_normal((2, h, w, d)).astype(dt) for _ in range(2))
    v, do = (rng.standard_normal((2, h, w, dv)).astype(dt) for _ in range(2))
    rel_bias = (300 + 0.3 * rng.standard_normal((2, 5, 5))).astype(np.float32)
    rel_bias[1, :, :] = -1e5  # -inf in float16: every query of head 1 would look empty
    r_h = (40 + rng.standard_normal((5, d)) / 2).astype(np.float32) / 40
    r_w = (10 + rng.standard_normal((2, 5, d))).astype(np.float32) / 10
    kw = {"boundary": "zero", "scale": 0.3, "rel_bias": rel_bias, "r_h": r_h, "r_w": r_w}
    out, lse = launcher.window_attention_forward(q, k, v, wy, wx, **kw)
    grads = launcher.window_attention_backward(q, k, v, out, lse, do, wy, wx, **kw)
    assert all(g.dtype == np.float32 for g in grads[3:])

    def reference(cdt, round_to=None):
        x = [a.astype(cdt) for a in (q, k, v)]
        tabs = {n: kw[n].astype(cdt) for n in ("rel_bias", "r_h", "r_w")}
        o, l_ = window_attention_forward(np, *x, wy, wx, boundary="zero", scale=0.3, **tabs)
        if round_to is not None:
            o = o.astype(round_to).astype(cdt)
        g = window_attention_backward(
            np, *x, o, l_, do.astype(cdt), wy, wx, boundary="zero", scale=0.3, **tabs
        )
        if round_to is not None:
            g = tuple(a.astype(round_to) for a in g[:3]) + tuple(g[3:])
        return (o, l_, *g)

    want, base = reference(np.float64), reference(np.float32, dt)
    names = ("out", "lse", "dq", "dk", "dv", "drel_bias", "dr_h", "dr_w")
    for name, g, wnt, b in zip(names, (out, lse, *grads), want, base, strict=True):
        _half_ok(g, wnt, b, name, per="element" if name == "lse" else "all")


class _FakeDevice:
    """Stands in for ``cupy.cuda.Device``: entering it makes it the current device."""

    current = [0]

    def __init__(self, dev=None):
        self.id = self.current[-1] if dev is None else dev

    def __enter__(self):
        self.current.append(self.id)
        return self

    def __exit__(self, *exc):
        self.current.pop()


class _OnDevice(np.ndarray):
    """A NumPy array that says it lives on fake device ``dev`` (as a CuPy array's ``device``)."""

    def __new__(cls, a, dev):
        out = np.asarray(a).view(cls)
        out.dev = dev
        return out

    def __array_finalize__(self, obj):
        self.dev = getattr(obj, "dev", None)

    @property
    def device(self):
        return _FakeDevice(self.dev)


class _RecordingCupy:
    """NumPy standing in for CuPy, recording the current fake device of every allocation."""

    ALLOCATE = ("empty", "zeros", "full", "ascontiguousarray", "asarray", "empty_like")

    def __init__(self, events):
        self.events = events
        self.cuda = types.SimpleNamespace(Device=_FakeDevice)

    def __getattr__(self, name):
        fn = getattr(np, name)
        if name not in self.ALLOCATE:
            return fn

        def allocate(*args, **kwargs):
            self.events.append(("allocate", name, _FakeDevice.current[-1]))
            return np.asarray(fn(*args, **kwargs))

        return allocate


def test_launchers_run_on_the_inputs_device(host_cupy, host_libs, rng, monkeypatch):
    """Finding 3: with the inputs on device 1 (an sm_61 card: no tensor cores) while device 0
    (an H100) is current, every allocation, module lookup and launch of the cupy launchers
    happens on device 1, and the kernels are chosen for device 1."""
    from arrayattn._reference.neighborhood import na_axis_windows
    from arrayattn.backends.cupy import _module, attention, criss_cross, neighborhood

    events = []
    monkeypatch.setitem(sys.modules, "cupy", _RecordingCupy(events))
    monkeypatch.setattr(_FakeDevice, "current", [0])
    props = {0: (90, 227 * 1024), 1: (61, 48 * 1024)}
    monkeypatch.setattr(_module, "current_device", lambda: props[_FakeDevice.current[-1]])

    def function(lib):
        def lookup(name, exprs, expr, shared=0):
            events.append(("lookup", expr, _FakeDevice.current[-1]))
            kernel = _HostKernel(lib, expr)

            def launch(*args, **kwargs):
                events.append(("launch", expr, _FakeDevice.current[-1]))
                return kernel(*args, **kwargs)

            return launch

        return lookup

    for family, module in (
        ("attention", attention),
        ("criss_cross", criss_cross),
        ("neighborhood", neighborhood),
    ):
        monkeypatch.setattr(module, "function", function(host_libs[family]))

    def on_1(shape, dtype):
        return _OnDevice(rng.standard_normal(shape).astype(dtype), 1)

    q, k, v = (
        on_1((2, 40, 64), np.float16),
        on_1((2, 50, 64), np.float16),
        on_1((2, 50, 32), np.float16),
    )
    out, lse = attention.sdpa_forward(q, k, v, bias=on_1((40, 50), np.float32), scale=0.125)
    attention.sdpa_backward(
        q, k, v, out, lse, on_1(out.shape, np.float16), bias=on_1((40, 50), np.float32), scale=0.1
    )
    x = on_1((1, 5, 6, 8), np.float32)
    out, lse = criss_cross.criss_cross_forward(x, x, x, scale=0.3)
    criss_cross.criss_cross_backward(x, x, x, out, lse, on_1(out.shape, np.float32), scale=0.3)
    wy, wx = na_axis_windows(5, 3, 1, "clamp"), na_axis_windows(6, 3, 1, "clamp")
    kw = {"boundary": "clamp", "scale": 0.3, "rel_bias": on_1((5, 5), np.float32)}
    out, lse = neighborhood.window_attention_forward(x, x, x, wy, wx, **kw)
    neighborhood.window_attention_backward(
        x, x, x, out, lse, on_1(out.shape, np.float32), wy, wx, **kw
    )
    kinds = {kind for kind, _, _ in events}
    assert kinds == {"allocate", "lookup", "launch"}
    assert [e for e in events if e[2] != 1] == []
    assert not any("_wmma<" in e[1] for e in events)  # sm_61: no tensor-core kernels
    assert _FakeDevice.current == [0]


#: Bias shapes for (B, H) = (2, 3), Lq = 70, Lk = 90: every way of broadcasting (a scalar-like
#: (1, 1) included), with and without leading axes.
BIAS_SHAPES = [
    (1, 1),
    (90,),
    (1, 90),
    (70, 1),
    (70, 90),
    (3, 1, 1),
    (3, 1, 90),
    (3, 70, 90),
    (2, 1, 1, 1),
    (2, 1, 70, 1),
    (2, 3, 1, 90),
    (2, 3, 70, 90),
]


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize(("dtype", "d"), [(np.float64, 16), (np.float16, 32)])
def test_sdpa_bias_gradient_every_broadcast(host_cupy, rng, shape, dtype, d):
    """Finding 5: the bias gradient from the dS tiles of the dQ kernels (CUDA cores in float64,
    tensor cores in float16), reduced over the broadcast axes, equals the reference for every
    bias shape; causal, so that skipped key tiles contribute zeros."""
    q = rng.standard_normal((2, 3, 70, d))
    k, v = rng.standard_normal((2, 3, 90, d)), rng.standard_normal((2, 3, 90, 8))
    kwargs = {"bias": rng.standard_normal(shape), "causal": "bottom_right"}
    _compare(
        aa.scaled_dot_product_attention,
        (q, k, v),
        kwargs,
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )
    assert any("sdpa_dbias_reduce" in e for e in host_cupy) == (shape not in [(2, 3, 70, 90)])


@pytest.mark.parametrize("shape", [(1, 1), (70, 90), (3, 1, 90), (2, 1, 70, 1)], ids=str)
def test_sdpa_bias_gradient_in_chunks(host_cupy, rng, monkeypatch, shape):
    """With room for the partials of one query head at a time, the dQ kernel and the reduction
    run once per head, the reduction adding to the gradient: the same result."""
    from arrayattn.backends import _cuda as _common

    monkeypatch.setattr(_common, "PARTIAL_BYTES", 1)
    q = rng.standard_normal((2, 3, 70, 16))
    k, v = rng.standard_normal((2, 3, 90, 16)), rng.standard_normal((2, 3, 90, 8))
    _compare(
        aa.scaled_dot_product_attention,
        (q, k, v),
        {"bias": rng.standard_normal(shape)},
        np.float64,
        rng,
    )
    assert sum("sdpa_dbias_reduce" in e for e in host_cupy) == 6


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_dbias_plan_cost(shape):
    """The cost of the bias gradient, O(B·H·Lq·Lk) for every bias shape: the dQ blocks write at
    most one partial per dS value (fewer where the bias broadcasts inside a block), and the
    reduction reads every partial exactly once, with at most 16 sequential additions per thread
    before its tree (unless 256 threads already share an element). The plan of a scaled-up call
    (B·H = 512, Lq = Lk = 2048) is checked without running it."""
    from arrayattn.backends._cuda import dbias_plan

    scale = {2: 16, 3: 32, 70: 2048, 90: 2048}
    big = tuple(scale.get(n, n) for n in shape)
    batch, lq, lk, bq = (16, 32), 2048, 2048, 64
    plan = dbias_plan(big, batch, lq, lk, bq, 4)
    nb = 16 * 32
    partials = nb * plan.pr * plan.pc
    assert partials <= nb * lq * lk
    size = math.prod(big)
    if plan.direct:
        assert partials == size
        return
    reads = 0
    for bh0, bh1, hptr, hbh in plan.chunks:
        assert sorted(hbh.tolist()) == list(range(bh1 - bh0))
        per_head = np.diff(hptr)
        per_element = per_head * (1 if plan.rows else plan.pr)
        reads += int(per_element.sum()) * (size // per_head.size)
        assert plan.lanes == 256 or -(-int(per_element.max()) // plan.lanes) <= 16
    assert reads == partials


def test_shared_memory_fits_sm80():
    """The tensor-core kernels need at most sm_80's 163 KiB of opt-in shared memory."""
    from arrayattn.backends.cupy import attention as launcher

    for dp in launcher.WMMA_DPS:
        for size in (
            launcher._wmma_shared(dp, 2),
            launcher._wmma_dkdv_shared(dp, 2),
            launcher._wmma_dq_shared(dp, 2),
        ):
            assert size <= 163 * 1024


def test_dkdv_wmma_two_blocks_per_sm():
    """Finding 7: at DP = 128 the dK/dV tensor-core kernel (dK, dV in fragments) takes shared
    memory for two blocks per SM on sm_80 (164 KiB per SM) and sm_90 (228 KiB), with the 1 KiB
    the driver reserves per block (it took 132 KiB, one block, before)."""
    from arrayattn.backends.cupy import attention as launcher

    per_block = launcher._wmma_dkdv_shared(128, 2) + 1024
    assert 2 * per_block <= 164 * 1024


def _nvrtc_reason():
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
        from arrayattn.backends.cupy._module import _include_dir

        _include_dir()
    except Exception as exc:  # not installed, library or headers missing
        return f"NVRTC is not usable here ({exc})"
    return None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_instantiation_uses_local_memory(family, arch):
    """Finding 6: ptxas (through NVRTC) reports no local memory (stack frame) and no spills for
    any instantiation the launchers list: row vectors are registers or shared memory, never
    local arrays (they took up to 8 KiB per thread before). docs/gpu.rst lists the figures."""
    reason = _nvrtc_reason()
    if reason:
        pytest.skip(reason)
    from arrayattn.backends.cupy import _module

    launcher = importlib.import_module(f"arrayattn.backends.cupy.{family}")
    usage = _module.resource_usage(f"{family}.cu", arch, launcher.NAME_EXPRESSIONS)
    local = {
        expr: u for expr, u in usage.items() if u["stack"] or u["spill_stores"] or u["spill_loads"]
    }
    assert local == {}


# -- criss-cross and neighbourhood attention -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_criss_cross(host_cupy, rng, dtype):
    args = (
        rng.standard_normal((2, 9, 11, 16)),
        rng.standard_normal((2, 9, 11, 16)),
        rng.standard_normal((2, 9, 11, 8)),
    )
    _compare(
        aa.criss_cross_attention,
        args,
        {"scale": 0.3},
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )
    assert host_cupy


@pytest.mark.parametrize(("dtype", "d", "dv"), [(np.float64, 160, 130), (np.float32, 300, 500)])
def test_criss_cross_wide(host_cupy, rng, dtype, d, dv):
    """Channel widths whose row vectors live in shared memory (finding 6), with fewer threads
    per block where they would not fit (float32, 300 + 500 channels)."""
    args = (
        rng.standard_normal((1, 4, 5, d)),
        rng.standard_normal((1, 4, 5, d)),
        rng.standard_normal((1, 4, 5, dv)),
    )
    _compare(aa.criss_cross_attention, args, {"scale": 0.05}, dtype, rng)
    assert all(e.endswith("true>") for e in host_cupy if "delta" not in e)


NA_CASES = {
    "rel_bias+rel_pos, dilation 2, zero padding": (
        (2, 3, 13, 17, 16),
        24,
        {"kernel_size": 5, "dilation": 2, "boundary": "zero"},
        True,
    ),
    "clamp, even kernel": ((1, 2, 9, 10, 8), 8, {"kernel_size": 4, "boundary": "clamp"}, False),
    # row vectors in shared memory (finding 6): float64 at 80/100 channels
    "wide channels": ((1, 1, 5, 6, 80), 100, {"kernel_size": 3, "boundary": "zero"}, True),
}


@pytest.mark.parametrize("case", sorted(NA_CASES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_neighborhood(host_cupy, rng, case, dtype):
    shape, dv, kwargs, rel = NA_CASES[case]
    q, k = rng.standard_normal(shape), rng.standard_normal(shape)
    v = rng.standard_normal(shape[:-1] + (dv,))
    kwargs = dict(kwargs)
    if rel:
        n = 2 * kwargs["kernel_size"] - 1
        kwargs["rel_bias"] = rng.standard_normal((shape[1], n, n))
        kwargs["rel_pos"] = {
            "r_h": rng.standard_normal((n, shape[-1])) / 4,
            "r_w": rng.standard_normal((n, shape[-1])) / 4,
        }
    _compare(
        aa.neighborhood_attention_2d,
        (q, k, v),
        kwargs,
        dtype,
        rng,
        half_criterion=dtype == np.float16,
    )
    assert host_cupy


# -- the emulation itself
# -------------------------------------------------------------------

_SHIM_PROBES = r"""
#include <mma.h>
namespace wm = nvcuda::wmma;
extern __shared__ __align__(128) unsigned char smem_raw[];

// A warp stores a 16x16 tile of ones, then every lane reads the tile back, with or without the
// __syncwarp the hardware needs between the two.
template <int SYNC>
__global__ void store_then_read(float* out) {
    float* tile = reinterpret_cast<float*>(smem_raw);
    wm::fragment<wm::accumulator, 16, 16, 16, float> f;
    wm::fill_fragment(f, 1.0f);
    wm::store_matrix_sync(tile, f, 16, wm::mem_row_major);
    if (SYNC) __syncwarp();
    for (int e = threadIdx.x; e < 256; e += 32) out[e] = tile[e];
}

__global__ void shuffle_xor(float* out, int lane_mask) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, lane_mask);
}
"""

_PROBE_EXPRS = ("store_then_read<0>", "store_then_read<1>", "shuffle_xor")


@pytest.fixture(scope="module")
def shim_probes(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_probe")
    cxx = _compiler(out)
    (out / "probes.cu").write_text(_SHIM_PROBES)
    src = out / "probes.cpp"
    src.write_text(_registry_source("probes", _PROBE_EXPRS, path=out / "probes.cu"))
    lib = out / "probes.so"
    return _finish_build(_start_build(cxx, out, src, lib), "probes", lib)


def test_shim_store_is_a_race_without_syncwarp(shim_probes):
    """A wmma store is seen by the warp only after a __syncwarp (as on a GPU, where each lane
    writes its own part): deleting a kernel's __syncwarp after a store makes its tests fail."""
    out = np.zeros(256, np.float32)
    _HostKernel(shim_probes, "store_then_read<1>")((1,), (32,), (out,), shared_mem=1024)
    assert (out == 1).all()
    _HostKernel(shim_probes, "store_then_read<0>")((1,), (32,), (out,), shared_mem=1024)
    assert np.isnan(out[::32]).all(), "lane 0 saw the store before a __syncwarp"


def test_shim_shuffle_xor(shim_probes):
    out = np.zeros(64, np.float32)
    _HostKernel(shim_probes, "shuffle_xor")((1,), (64,), (out, 5))
    assert out.tolist() == [float(t ^ 5) for t in range(64)]


def test_dynamic_shared_memory_declared_once():
    """Each source declares its dynamic shared memory once, so every kernel of a module sees
    the same alignment (two declarations with different __align__ in one file are ill-formed)."""
    for name in sorted(f for f in os.listdir(CUPY_DIR) if f.endswith(".cu")):
        with open(os.path.join(CUPY_DIR, name), encoding="utf-8") as fh:
            text = fh.read()
        decls = re.findall(r"extern\s+__shared__[^;]*;", text)
        assert len(decls) <= 1, (name, decls)


# -- the registry-driven kernel-conformance check (tests/kernel_conformance.py) --------------------


def _cupy_cases():
    from kernel_conformance import cases
    from test_kernels import _declared

    return list(cases(("cupy",), _declared))


@pytest.mark.parametrize("case", _cupy_cases(), ids=lambda c: "-".join(map(str, c)))
def test_cupy_kernel_conforms_on_host(host_cupy, case):
    """Every cupy kernel x example of its op x dtype against the reference, through the same
    check as the CPU and simulated kernels."""
    from arrayattn import _registry
    from kernel_conformance import check_kernel

    op_name, backend, example, dtype = case
    kernel = _registry.kernel_for(aa.registered_ops()[op_name], "cupy")
    check_kernel(op_name, backend, example, dtype, kernel=kernel)

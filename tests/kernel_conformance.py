"""The kernel-conformance check: one backend kernel of one op against the op's reference.

Built from the registry (:func:`cases`), so a kernel is tested the moment it is registered. For a
call (an op's example in a given dtype) it checks, against the array-API reference run on the same
inputs in float64:

* the outputs, within the kernel's declared tolerance for that dtype (relative to the largest
  magnitude of the reference result); float16/bfloat16 by FlashAttention's criterion
  ``max|out - ref64| <= 2 max|naive - ref64| + eps``, ``naive`` the reference in that dtype;
* the residual record: the same names, shapes and dtypes as the reference's in the same dtype
  (framework adapters build their graphs from the reference's record);
* every gradient, for random cotangents, the same way;
* for a kernel declared deterministic, that a second run gives bitwise the same results.

Used by ``tests/test_kernels.py`` (CPU kernels; the numba_cuda kernels under the CUDA simulator;
the GPU kernels on a device with the ``gpu`` marker) and by ``tests/test_cupy_on_host.py`` (the
CuPy kernels compiled as host C++).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import arrayattn as aa
from arrayattn import _registry
from arrayattn._kernel import Kernel
from support import to_numpy

#: Dtypes the check runs in, where the kernel declares them. No bfloat16: NumPy and CuPy arrays
#: cannot hold it (the cupy kernels' bfloat16 path has its own test in test_cupy_on_host.py).
DTYPES = ("float64", "float32", "float16")
_EPS = {"float16": 2.0**-10}


def cases(backends: tuple[str, ...], kernels_of: Callable[[str], dict[str, Kernel]]) -> Iterator:
    """(op name, backend, example index, dtype) for every kernel the given backends declare and
    every example (cast to every dtype the kernel takes) that the kernel's requirements accept."""
    rng = np.random.default_rng(0)
    for name, op in aa.registered_ops().items():
        if op.examples is None:
            continue
        examples = op.examples(rng)
        for backend in backends:
            kernel = kernels_of(backend).get(name)
            if kernel is None:
                continue
            for dtype in DTYPES:
                if kernel.dtypes is not None and dtype not in kernel.dtypes:
                    continue
                for i, (args, kwargs) in enumerate(examples):
                    npdt = _numpy_dtype(dtype)
                    call = op._prepare(*_cast(args, npdt), **_cast(kwargs, npdt))
                    if not kernel.not_supported_reasons(call):
                        yield name, backend, i, dtype


def uncovered(backends: tuple[str, ...], kernels_of: Callable[[str], dict[str, Kernel]]) -> list:
    """(op name, backend) of every declared kernel that no example exercises."""
    covered = {(name, backend) for name, backend, _, _ in cases(backends, kernels_of)}
    return [
        (name, backend)
        for backend in backends
        for name in kernels_of(backend)
        if (name, backend) not in covered
    ]


def _cast(value: Any, dtype: Any) -> Any:
    """Floating arrays (also inside dicts and tuples) cast to ``dtype``; the rest as it is."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(dtype)
    return value


def _numpy_dtype(name: str) -> Any:
    return np.dtype(name)


def _map_arrays(value: Any, fn: Callable[[Any], Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _map_arrays(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_arrays(v, fn) for v in value)
    if hasattr(value, "__array_namespace__") or isinstance(value, np.ndarray):
        return fn(value)
    return value


def _flat_results(outs: tuple, grads: dict) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for i, o in enumerate(outs):
        flat[f"out{i}"] = np.asarray(to_numpy(o), dtype=np.float64)

    def walk(prefix: str, g: Any) -> None:
        if g is None:
            return
        if isinstance(g, dict):
            for k, v in g.items():
                walk(f"{prefix}[{k}]", v)
        elif isinstance(g, (tuple, list)):
            for k, v in enumerate(g):
                walk(f"{prefix}[{k}]", v)
        else:
            flat[prefix] = np.asarray(to_numpy(g), dtype=np.float64)

    for key, g in grads.items():
        walk(f"d{key}", g)
    return flat


def _run(kernel: Kernel, call, arrays: dict, cts_of: Callable[[tuple], tuple], to_backend):
    xp = call.xp if to_backend is None else to_backend.xp
    args = dict(arrays) if to_backend is None else _map_arrays(dict(arrays), to_backend.asarray)
    extra = {"ops": _inner_ops(kernel)} if kernel.uses else {}
    outs, saved = kernel.fwd(xp, args, call.options, True, **extra)
    cts = cts_of(outs)
    if to_backend is not None:
        cts = tuple(to_backend.asarray(c) for c in cts)
    grads = kernel.bwd(xp, dict(saved), call.options, cts, **extra)
    return outs, saved, grads


def _inner_ops(kernel: Kernel) -> Any:
    from arrayattn._op import _inner_ops

    return _inner_ops(kernel.uses)


def _saved_signature(saved: dict) -> dict[str, Any]:
    sig = {}
    for key, a in saved.items():
        if isinstance(a, aa.Residuals):
            sig[key] = ("record", a.op)
        else:
            sig[key] = None if a is None else (tuple(a.shape), str(np.dtype(to_numpy(a).dtype)))
    return sig


def check_kernel(
    op_name: str, backend: str, example: int, dtype: str, *, kernel: Kernel | None = None,
    to_backend: Any = None,
) -> None:  # fmt: skip
    """Assert that ``backend``'s kernel of ``op_name`` conforms on one example in one dtype.

    ``to_backend`` (optional) has ``xp`` and ``asarray`` to run the kernel on another namespace
    (CuPy on a device); by default the kernel runs on NumPy arrays.
    """
    op = aa.registered_ops()[op_name]
    if kernel is None:
        kernel = _registry.kernels(backend)[op_name]
    args, kwargs = op.examples(np.random.default_rng(0))[example]
    npdt = _numpy_dtype(dtype)
    args, kwargs = _cast(args, npdt), _cast(kwargs, npdt)
    call = op._prepare(*args, **kwargs)
    assert kernel.not_supported_reasons(call) == [], kernel.not_supported_reasons(call)

    def cotangents(outs: tuple) -> tuple:
        local = np.random.default_rng(2000 + example)
        return tuple(
            local.standard_normal(tuple(o.shape)).astype(np.asarray(to_numpy(o)).dtype)
            for o in outs
        )

    outs, saved, grads = _run(kernel, call, call.arrays, cotangents, to_backend)
    got = _flat_results(outs, grads)

    # The reference in float64 on the same (rounded) inputs, and in the same dtype.
    args64, kwargs64 = _cast(args, np.float64), _cast(kwargs, np.float64)
    call64 = op._prepare(*args64, **kwargs64)
    ref = op.reference
    cts = tuple(c.astype(np.float64) for c in cotangents(outs))
    r_outs, _, r_grads = _run(ref, call64, call64.arrays, lambda _: cts, None)
    want = _flat_results(r_outs, r_grads)
    n_outs, n_saved, n_grads = _run(ref, call, call.arrays, cotangents, None)

    assert _saved_signature(saved) == _saved_signature(n_saved), (
        f"{op_name}[{backend}]: residual record differs from the reference's"
    )
    assert set(got) == set(want), (sorted(got), sorted(want))
    naive = _flat_results(n_outs, n_grads)
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, (op_name, backend, key, g.shape, w.shape)
        fin = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), fin, err_msg=f"{op_name}[{backend}] {key}")
        np.testing.assert_array_equal(g[~fin], w[~fin], err_msg=f"{op_name}[{backend}] {key}")
        if not fin.any():
            continue
        err = float(np.max(np.abs(g[fin] - w[fin])))
        scale = max(float(np.max(np.abs(w[fin]))), 1.0)
        if dtype in kernel.rtol:
            bound = kernel.rtol[dtype] * scale
        else:  # low precision: FlashAttention's criterion against the naive same-dtype result
            bound = 2 * float(np.max(np.abs(naive[key][fin] - w[fin]))) + _EPS[dtype] * scale
        assert err <= bound, f"{op_name}[{backend}] {dtype} {key}: error {err:.3e} > {bound:.3e}"

    if kernel.deterministic:
        outs2, _, grads2 = _run(kernel, call, call.arrays, cotangents, to_backend)
        again = _flat_results(outs2, grads2)
        for key, g in got.items():
            np.testing.assert_array_equal(
                again[key], g, err_msg=f"{op_name}[{backend}]: not deterministic ({key})"
            )

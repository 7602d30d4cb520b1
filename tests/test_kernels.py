"""Kernel conformance, generated from the registry: every op x backend kernel x example x dtype.

Which backends run depends on where the suite runs:

* the ordinary run: the CPU kernels (``numba``) on NumPy arrays;
* under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, the ``tests/cudasim`` invocation imports
  this module too): the ``numba_cuda`` kernels on NumPy arrays;
* with a CUDA device (``-m gpu``): the ``cupy`` and ``numba_cuda`` kernels on CuPy arrays.

The CuPy kernels also run on the CPU as host C++ in ``tests/test_cupy_on_host.py``, through the
same check.
"""

from __future__ import annotations

import os
import types

import pytest

from arrayattn import _registry
from kernel_conformance import cases, check_kernel, uncovered

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _declared(backend: str) -> dict:
    """The backend's kernels, adapted to the op protocol, whether or not it is usable here."""
    if backend == "numba" and _registry._unavailable("numba") is not None:
        return {}
    try:
        raw = _registry._backend_kernels(backend)
    except Exception:  # its modules cannot be imported here (no cupy): nothing to collect
        return {}
    ops = {name: op for name, op in _registry.registered_ops().items()}
    return {name: ops[name].adapt(k) for name, k in raw.items()}


def _ids(case):
    return "-".join(map(str, case))


CPU_CASES = [] if SIMULATED else list(cases(("numba",), _declared))
SIM_CASES = list(cases(("numba_cuda",), _declared)) if SIMULATED else []


@pytest.mark.parametrize("case", CPU_CASES, ids=_ids)
def test_cpu_kernel_conforms(case):
    check_kernel(*case)


@pytest.mark.skipif(SIMULATED, reason="the ordinary run checks the CPU kernels")
def test_every_cpu_kernel_is_exercised():
    """A kernel whose requirements reject every example of its op would never be checked."""
    assert uncovered(("numba",), _declared) == []


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATED, reason="needs NUMBA_ENABLE_CUDASIM=1 (tests/cudasim run)")
@pytest.mark.parametrize("case", SIM_CASES, ids=_ids)
def test_simulated_cuda_kernel_conforms(case):
    op_name, backend, example, dtype = case
    check_kernel(op_name, backend, example, dtype, kernel=_declared(backend)[op_name])


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATED, reason="needs NUMBA_ENABLE_CUDASIM=1 (tests/cudasim run)")
def test_every_simulated_kernel_is_exercised():
    assert uncovered(("numba_cuda",), _declared) == []


def _gpu_cases():
    try:
        import cupy

        if not cupy.cuda.is_available():
            return []
    except Exception:
        return []
    return list(cases(("cupy", "numba_cuda"), _declared))


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases(), ids=_ids)
def test_gpu_kernel_conforms(case):
    import cupy

    to_device = types.SimpleNamespace(xp=cupy, asarray=cupy.asarray)
    check_kernel(*case, to_backend=to_device)

"""Fixtures: ``xp`` crosses the array namespaces, ``backend`` the NumPy backends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings

import arrayattn as aa
from support import NAMESPACES, load_namespace

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile("ci")

#: Backends that run on NumPy inputs on this machine's CPU.
CPU_BACKENDS = ("array_api", "numba")


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """An array-API namespace (skipped where it is not installed or has no device)."""
    return load_namespace(request.param)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Runs the test with the named backend selected (skipped where it is unavailable)."""
    name = request.param
    info = {b.name: b for b in aa.backends()}[name]
    if not info.available:
        pytest.skip(f"backend {name} unavailable: {info.reason}")
    with aa.use_backend(name):
        yield name


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)

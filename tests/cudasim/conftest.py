"""Numba-CUDA kernels under the CUDA simulator: a separate pytest invocation.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is first imported, so these tests run in their
own process (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q``) and are skipped in the
ordinary run. The simulator runs every thread as a Python thread (about 140 µs per thread step), so
shapes and tiles are tiny.
"""

from __future__ import annotations

import os

import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REASON = (
    "CUDA-simulator tests need NUMBA_ENABLE_CUDASIM=1 set before numba is imported: "
    "run `NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q` separately"
)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cudasim)
            if not SIMULATED:
                item.add_marker(pytest.mark.skip(reason=REASON))
            else:
                pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

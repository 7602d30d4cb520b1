"""The ``numba`` backend: ``KERNELS`` maps op names to :class:`arrayattn._op.Kernel`.

Kernels live in one module per mechanism family (as in ``arrayattn/``); each defines its own
``KERNELS`` and is listed in ``_FAMILIES``.
"""

import importlib

_FAMILIES: tuple[str, ...] = (
    "attention",
    "channel",
    "co_attention",
    "criss_cross",
    "halo",
    "luong",
    "neighborhood",
    "primitives",
    "sparse",
)

KERNELS: dict = {}
for _family in _FAMILIES:
    KERNELS.update(importlib.import_module(f"{__name__}.{_family}").KERNELS)

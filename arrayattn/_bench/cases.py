"""Every benchmark case, by name: asv and ``python -m arrayattn bench`` share these definitions.

Each mechanism family keeps its cases in ``cases_<family>.py`` (a ``CASES`` dict) listed here.
"""

from __future__ import annotations

import importlib

from .case import Case

__all__ = ["CASES", "Case"]

_FAMILIES: tuple[str, ...] = (
    "attention",
    "criss_cross",
    "channel",
    "neighborhood",
    "luong",
    "linear_attention",
    "sparse",
    "non_local",
    "danet",
    "co_attention",
    "fused",
    "set_transformer",
)

CASES: dict[str, Case] = {}
for _family in _FAMILIES:
    CASES.update(importlib.import_module(f"{__package__}.cases_{_family}").CASES)

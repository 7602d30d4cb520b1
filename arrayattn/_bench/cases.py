"""Every benchmark case, by name: asv and ``python -m arrayattn bench`` share these definitions.

Each mechanism family keeps its cases in ``cases_<family>.py`` (a ``CASES`` dict), found here by
name.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from .case import Case

__all__ = ["CASES", "Case"]

CASES: dict[str, Case] = {}
for _info in sorted(pkgutil.iter_modules(sys.modules[__package__].__path__), key=lambda m: m.name):
    if _info.name.startswith("cases_"):
        CASES.update(importlib.import_module(f"{__package__}.{_info.name}").CASES)

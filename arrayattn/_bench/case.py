"""The benchmark case record shared by the per-family case modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Case"]


@dataclass(frozen=True)
class Case:
    """A benchmark: a runner factory per implementation and a FLOP count.

    A runner factory takes (params, dtype, mode) and returns a zero-argument callable doing one
    forward (``mode='fwd'``) or one forward and backward (``mode='fwd_bwd'``). ``defaults`` are the
    size parameters (ints) a run may override.
    """

    name: str
    defaults: dict[str, Any]
    flops: Callable[[dict, str], float]
    arrayattn: Callable[[dict, str, str], Callable[[], Any]]
    torch: Callable[[dict, str, str], Callable[[], Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)

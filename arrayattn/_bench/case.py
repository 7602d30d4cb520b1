"""The benchmark case record shared by the per-family case modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Case", "torch_runner"]


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


def torch_runner(forward: Callable[[], Any], leaves, cotangents, mode: str) -> Callable[[], Any]:
    """The PyTorch side of a case: ``forward()`` under ``no_grad`` (``mode='fwd'``), or forward and
    ``torch.autograd.grad`` of its output(s) for ``leaves`` (made to require grad here) against
    ``cotangents``."""
    import torch

    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return forward()

        return run_fwd
    leaves = list(leaves)
    for x in leaves:
        x.requires_grad_()

    def run_fwd_bwd():
        return torch.autograd.grad(forward(), leaves, cotangents)

    return run_fwd_bwd

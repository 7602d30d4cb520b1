"""The benchmark case record shared by the per-family case modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Case", "pair_op_runner", "tensors", "torch_runner"]


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


def pair_op_runner(op_name: str, make_inputs, options: Callable[[dict], dict] | None = None):
    """The arrayattn side of a case whose op takes ``(x, y, params, **options(p))`` and returns two
    arrays; ``make_inputs(p, dtype)`` gives ``(x, y, params, cotangent_0, cotangent_1)``."""

    def factory(p: dict, dtype: str, mode: str):
        import arrayattn as aa

        op = getattr(aa, op_name)
        x, y, params, ct0, ct1 = make_inputs(p, dtype)
        kw = options(p) if options else {}
        if mode == "fwd":
            return lambda: op(x, y, params, **kw)

        def run():
            _, res = op.fwd(x, y, params, **kw)
            return op.bwd(res, (ct0, ct1))

        return run

    return factory


def tensors(arrays):
    """NumPy arrays (or mappings of them) as torch tensors sharing their memory."""
    import torch

    return tuple(
        {k: torch.from_numpy(v) for k, v in a.items()}
        if isinstance(a, dict)
        else torch.from_numpy(a)
        for a in arrays
    )

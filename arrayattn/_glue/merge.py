"""Glue of merge_attention: options, residual schema, reference kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._kernel import Kernel, Options
from .._reference.merge import merge_backward, merge_forward
from .._xp import Array

__all__ = ["MERGE_REFERENCE", "MERGE_RESIDUALS", "MergeOptions"]


@dataclass(frozen=True)
class MergeOptions(Options):
    parts: int  # how many (out, lse) parts were given


MERGE_RESIDUALS = ("outs[*", "lses[*", "out", "lse")


# -- the one place where the tuple-valued arguments ``outs`` and ``lses`` are handled -----------
#
# They travel through ``Call.arrays`` as tuples (the kernel reads them as such); a Residuals
# record is flat, so they are saved under the keys ``outs[0]``, ``outs[1]``, ... and read back by
# count (the option ``parts``). Nothing else in the op knows how the parts are stored.

_SEQUENCES = ("outs", "lses")


def _flat_parts(arrays: dict[str, Any]) -> dict[str, Array]:
    return {f"{name}[{i}]": a for name in _SEQUENCES for i, a in enumerate(arrays[name])}


def _parts(saved: dict[str, Any], name: str, count: int) -> tuple[Array, ...]:
    return tuple(saved[f"{name}[{i}]"] for i in range(count))


def _fwd(xp, arrays, options, save):
    out, lse = merge_forward(xp, arrays["outs"], arrays["lses"])
    return (out, lse), (dict(_flat_parts(arrays), out=out, lse=lse) if save else {})


def _bwd(xp, saved, options, cotangents):
    n = options.parts
    outs, lses = _parts(saved, "outs", n), _parts(saved, "lses", n)
    douts, dlses = merge_backward(
        xp, outs, lses, saved["out"], saved["lse"], cotangents[0], cotangents[1]
    )
    return {"outs": douts, "lses": dlses}


MERGE_REFERENCE = Kernel(_fwd, _bwd, dtypes=None)

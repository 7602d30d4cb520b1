"""Glue of the Luong / Bahdanau / local attention family: options, residuals, reference kernel.

The three ops share one kernel: ``names`` says what the two state arguments are called
(``h_t``/``h_s`` or Bahdanau's ``s_prev``/``h``), ``mode`` is ``None`` for global attention.
Every backend saves the same flat record (leading dimensions kept): the states, ``params.<key>``,
the alignment ``align`` and, where the call needs them, the score projections ``q`` (general),
``qa``/``kb`` (additive), and the local centre ``pos`` with the predictive ``hidden``/``sig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._kernel import Kernel, Options
from .._reference.luong import attention_backward, attention_forward

__all__ = ["LUONG_REFERENCE", "LUONG_RESIDUALS", "LuongOptions"]


@dataclass(frozen=True)
class LuongOptions(Options):
    score: str
    names: tuple[str, str]  # the two state arguments (h_t, h_s) or (s_prev, h)
    mode: str | None = None  # None (global), "monotonic" or "predictive"
    window: int | None = None
    offset: int = 0
    center: str = "floor"
    p_scale: str = "S"
    index_base: int = 0


LUONG_RESIDUALS = (
    "h_t", "h_s", "params.*", "align", "q?", "qa?", "kb?", "pos?", "hidden?", "sig?",
)  # fmt: skip

_AUX = ("q", "qa", "kb")
_LOCAL = ("pos", "hidden", "sig")


def _local(options: LuongOptions) -> dict | None:
    """The local-window options of a call (``None`` for global attention)."""
    if options.mode is None:
        return None
    keys = ("mode", "window", "offset", "center", "p_scale", "index_base")
    return {k: getattr(options, k) for k in keys}


def _ref_fwd(xp, arrays, options, save):
    context, weights, saved = attention_forward(
        xp, arrays["h_t"], arrays["h_s"], arrays["params"], arrays["mask"],
        kind=options.score, local=_local(options),
    )  # fmt: skip
    if not save:
        return (context, weights), {}
    record = {"h_t": arrays["h_t"], "h_s": arrays["h_s"], "align": saved["align"]}
    record.update(saved["aux"])
    record.update(saved.get("local", {}))
    record.update({f"params.{k}": a for k, a in (arrays["params"] or {}).items()})
    return (context, weights), record


def _ref_bwd(xp, saved, options, cotangents):
    params = {k[len("params.") :]: a for k, a in saved.items() if k.startswith("params.")}
    record = {"align": saved["align"], "aux": {k: saved[k] for k in _AUX if k in saved}}
    if options.mode is not None:
        record["local"] = {k: saved[k] for k in _LOCAL if k in saved}
    dh_t, dh_s, dparams = attention_backward(
        xp, saved["h_t"], saved["h_s"], params, record, cotangents[0], cotangents[1],
        kind=options.score, local=_local(options),
    )  # fmt: skip
    names = options.names
    return {names[0]: dh_t, names[1]: dh_s, "params": dparams if params else None}


LUONG_REFERENCE = Kernel(_ref_fwd, _ref_bwd, dtypes=None)

"""The op protocol: callable op objects with ``fwd``/``bwd``, residual records and gradient records.

An op is defined by a *prepare* function whose signature and docstring are the public ones: it
validates the arguments and returns a :class:`Call` (the namespace, the array arguments by name and
the static options, already normalised). The op object then resolves a backend
(:mod:`arrayattn._registry`) and runs that backend's :class:`Kernel`::

    op(*a, **kw)        -> outputs                       (nothing kept for backward)
    op.fwd(*a, **kw)    -> (outputs, Residuals)
    op.bwd(res, ct)     -> Grads (a NamedTuple over the differentiable arguments)
    vjp(op, *a, **kw)   -> (outputs, pullback)           (pullback(ct) == op.bwd(res, ct))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._xp import Array

__all__ = ["Call", "Kernel", "Op", "Residuals", "op", "registered_ops", "vjp"]


@dataclass(frozen=True)
class Call:
    """A validated call of an op.

    ``arrays`` holds every array argument by name (``None`` where not given; a parameter mapping
    is a ``dict`` of arrays under its argument name). ``static`` holds the normalised options, all
    hashable. ``outputs`` names the outputs; more than one name means the op returns a tuple.
    """

    xp: Any
    arrays: Mapping[str, Any]
    static: Mapping[str, Hashable]
    outputs: tuple[str, ...] = ("out",)


class Kernel(NamedTuple):
    """One backend's implementation of one op.

    ``fwd(xp, arrays, static, save) -> (outputs_tuple, saved)`` where ``saved`` is a flat mapping of
    name -> array (or ``None``) holding only what backward needs (empty when ``save`` is false).
    ``bwd(xp, saved, static, cotangents) -> {argument name: gradient}``; cotangents arrive as a
    tuple with one array per output (zeros substituted for ``None``).
    ``supports(call) -> str | None`` gives the reason this kernel cannot run a call, or ``None``.
    """

    fwd: Callable[..., tuple[tuple[Array, ...], dict[str, Array | None]]]
    bwd: Callable[..., dict[str, Any]]
    supports: Callable[[Call], str | None] = lambda call: None


@dataclass(frozen=True, eq=False)
class Residuals:
    """What backward needs: a flat record of arrays plus hashable static options.

    A framework adapter saves ``arrays`` (a flat name -> array mapping) as its own tensors and
    rebuilds the record with :meth:`with_arrays`.
    """

    op: str
    backend: str
    arrays: Mapping[str, Array | None]
    static: tuple[tuple[str, Hashable], ...]
    outputs: tuple[tuple[str, tuple[int, ...], Any], ...] = field(default=())

    @property
    def options(self) -> dict[str, Hashable]:
        return dict(self.static)

    def with_arrays(self, arrays: Mapping[str, Array | None]) -> Residuals:
        """The same record holding other arrays (e.g. the adapter's tensors viewed as arrays)."""
        if set(arrays) != set(self.arrays):
            raise ValueError(
                f"arrays: expected the keys {sorted(self.arrays)}, got {sorted(arrays)}"
            )
        return replace(self, arrays=dict(arrays))


# A kernel that composes other ops (multi-head attention runs scaled_dot_product_attention) saves
# their Residuals under a key. The public record stays flat: the inner arrays go in under
# "key/name" and the inner record's static part under the static key "key/".
_NEST = "/"


def _flatten(saved: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[tuple[str, Hashable], ...]]:
    arrays: dict[str, Any] = {}
    nested: list[tuple[str, Hashable]] = []
    for key, value in saved.items():
        if isinstance(value, Residuals):
            arrays.update({f"{key}{_NEST}{name}": a for name, a in value.arrays.items()})
            nested.append((f"{key}{_NEST}", (value.op, value.backend, value.static, value.outputs)))
        else:
            arrays[key] = value
    return arrays, tuple(nested)


def _unflatten(res: Residuals) -> tuple[dict[str, Any], dict[str, Hashable]]:
    saved = {k: a for k, a in res.arrays.items() if _NEST not in k}
    options = {}
    for key, value in res.static:
        if not key.endswith(_NEST):
            options[key] = value
            continue
        op, backend, static, outputs = value
        inner = {k[len(key) :]: a for k, a in res.arrays.items() if k.startswith(key)}
        saved[key[: -len(_NEST)]] = Residuals(op, backend, inner, static, outputs)
    return saved, options


def _arrays_only(value: Any) -> Any:
    """NumPy reductions to 0-d give scalars (``np.float64``); ops return 0-d arrays instead."""
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, dict):
        return {k: _arrays_only(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_arrays_only(v) for v in value)
    return value


_OPS: dict[str, Op] = {}


def registered_ops() -> dict[str, Op]:
    """Every public op, by name, in registration order."""
    return dict(_OPS)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


class Op:
    """A public op: call it for the forward pass; ``fwd``/``bwd`` for training.

    Built by the :func:`op` decorator; see the module docstring.
    """

    def __init__(
        self,
        prepare: Callable[..., Call],
        *,
        differentiable: Sequence[str],
        reference: Kernel,
        examples: Callable[[Any], list[tuple[tuple, dict]]] | None = None,
        composite: bool = False,
    ):
        functools.update_wrapper(self, prepare)
        self.name: str = prepare.__name__
        self._prepare = prepare
        self.differentiable: tuple[str, ...] = tuple(differentiable)
        self.Grads = NamedTuple(
            f"{_camel(self.name)}Grads", [(arg, Any) for arg in self.differentiable]
        )
        self.Grads.__doc__ = (
            f"Gradients of {self.name} with respect to its differentiable arguments "
            f"({', '.join(self.differentiable)}); ``None`` for an argument that was not given."
        )
        self.reference = reference
        self.examples = examples
        # A composite op's reference is array-API glue around other ops, which dispatch on the
        # active backend; so it runs under any backend that accepts the inputs.
        self.composite = composite

    def __repr__(self) -> str:
        return f"<arrayattn op {self.name}>"

    def __reduce__(self) -> str:  # ops pickle by reference, like functions
        return self.name

    # -- forward ---------------------------------------------------------------------------------

    def _run_forward(self, args: tuple, kwargs: dict, save: bool):
        from ._registry import resolve

        call = self._prepare(*args, **kwargs)
        backend, kernel = resolve(self, call)
        outs, saved = kernel.fwd(call.xp, dict(call.arrays), dict(call.static), save)
        outs = _arrays_only(tuple(outs))
        if len(outs) != len(call.outputs):
            raise AssertionError(f"{self.name}[{backend}] returned {len(outs)} outputs")
        return call, backend, outs, saved

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call, _, outs, _ = self._run_forward(args, kwargs, save=False)
        return outs if len(call.outputs) > 1 else outs[0]

    def fwd(self, *args: Any, **kwargs: Any) -> tuple[Any, Residuals]:
        """Forward pass that also returns the :class:`Residuals` backward needs."""
        call, backend, outs, saved = self._run_forward(args, kwargs, save=True)
        arrays, nested = _flatten(saved)
        res = Residuals(
            op=self.name,
            backend=backend,
            arrays=arrays,
            static=tuple(call.static.items()) + nested,
            outputs=tuple(
                (name, tuple(o.shape), o.dtype) for name, o in zip(call.outputs, outs, strict=True)
            ),
        )
        return (outs if len(call.outputs) > 1 else outs[0]), res

    # -- backward --------------------------------------------------------------------------------

    def bwd(self, res: Residuals, cotangents: Any) -> Any:
        """Gradients of every differentiable argument given the output cotangent(s).

        Parameters
        ----------
        res : Residuals
            From :meth:`fwd` of this op.
        cotangents : array or tuple of arrays
            One per output, shaped and typed like it; for an op with several outputs a tuple in
            which ``None`` stands for an output that does not reach the loss.
        """
        from ._registry import kernel_for

        if not isinstance(res, Residuals) or res.op != self.name:
            got = res.op if isinstance(res, Residuals) else type(res).__name__
            raise TypeError(f"res: expected the Residuals of {self.name}, got {got}")
        cts = self._check_cotangents(res, cotangents)
        kernel = kernel_for(self, res.backend)
        xp = array_api_compat.array_namespace(*[a for a in res.arrays.values() if a is not None])
        saved, options = _unflatten(res)
        grads = kernel.bwd(xp, saved, options, cts)
        return self.Grads(**{arg: _arrays_only(grads.get(arg)) for arg in self.differentiable})

    def _check_cotangents(self, res: Residuals, cotangents: Any) -> tuple[Array, ...]:
        names = [name for name, _, _ in res.outputs]
        if len(names) == 1:
            if cotangents is None or isinstance(cotangents, tuple):
                raise TypeError(
                    f"cotangents: {self.name} has one output; expected one array, "
                    f"got {type(cotangents).__name__}"
                )
            cotangents = (cotangents,)
        elif not isinstance(cotangents, (tuple, list)) or len(cotangents) != len(names):
            raise TypeError(
                f"cotangents: {self.name} has {len(names)} outputs ({', '.join(names)}); expected "
                f"a tuple of {len(names)} arrays or None"
            )
        xp = array_api_compat.array_namespace(*[a for a in res.arrays.values() if a is not None])
        like = next(a for a in res.arrays.values() if a is not None)
        out = []
        for (name, shape, dtype), ct in zip(res.outputs, cotangents, strict=True):
            label = f"cotangent of {name}"
            if ct is None:
                out.append(xp.zeros(shape, dtype=dtype, device=array_api_compat.device(like)))
                continue
            if not array_api_compat.is_array_api_obj(ct):
                raise TypeError(f"{label}: expected an array, got {type(ct).__name__}")
            if tuple(ct.shape) != shape:
                raise ValueError(f"{label}: expected shape {shape}, got {tuple(ct.shape)}")
            if ct.dtype != dtype:
                raise TypeError(f"{label}: expected dtype {dtype}, got {ct.dtype}")
            out.append(ct)
        return tuple(out)

    # -- dispatch report -------------------------------------------------------------------------

    def explain(self, *args: Any, **kwargs: Any) -> str:
        """Which backend would run this call and why each other backend would not."""
        from ._registry import explain

        return explain(self, self._prepare(*args, **kwargs))


def op(
    *,
    differentiable: Sequence[str],
    reference: Kernel,
    examples: Callable[[Any], list[tuple[tuple, dict]]] | None = None,
    composite: bool = False,
) -> Callable[[Callable[..., Call]], Op]:
    """Decorator turning a prepare function into a registered :class:`Op`.

    ``composite=True`` declares that the reference only glues other ops together with array-API
    code (multi-head attention around scaled dot-product attention): it then runs under any backend
    setting that accepts the inputs, and its inner ops run on that backend.
    """

    def wrap(prepare: Callable[..., Call]) -> Op:
        new = Op(
            prepare,
            differentiable=differentiable,
            reference=reference,
            examples=examples,
            composite=composite,
        )
        if new.name in _OPS:
            raise RuntimeError(f"op {new.name!r} registered twice")
        _OPS[new.name] = new
        return new

    return wrap


def vjp(op: Op, *args: Any, **kwargs: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Run ``op`` forward; return ``(outputs, pullback)``, ``pullback(ct) == op.bwd(res, ct)``.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    >>> out, pullback = aa.vjp(aa.scaled_dot_product_attention, q, k, v, causal=True)
    >>> g = pullback(np.ones_like(out))
    >>> g.q.shape, g.bias is None
    ((2, 5, 4), True)
    """
    if not isinstance(op, Op):
        raise TypeError(f"op: expected an arrayattn op, got {type(op).__name__}")
    out, res = op.fwd(*args, **kwargs)
    return out, functools.partial(op.bwd, res)

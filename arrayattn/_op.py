"""The op protocol: callable op objects with ``fwd``/``bwd``, residual records and gradient records.

An op is defined by a *prepare* function whose signature and docstring are the public ones: it
validates the arguments and returns a :class:`~arrayattn._kernel.Call` (the namespace, the array
arguments by name and the op's typed options). The op object then resolves a backend
(:mod:`arrayattn._registry`) and runs that backend's :class:`~arrayattn._kernel.Kernel`::

    op(*a, **kw)        -> outputs                       (nothing kept for backward)
    op.fwd(*a, **kw)    -> (outputs, Residuals)
    op.bwd(res, ct)     -> Grads (a NamedTuple over the differentiable arguments)
    vjp(op, *a, **kw)   -> (outputs, pullback)           (pullback(ct) == op.bwd(res, ct))
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar

import array_api_compat
import numpy as np

from . import _registry
from ._config import get_backend
from ._kernel import _NEST, Call, Kernel, Residuals, Skeleton
from ._xp import Array

__all__ = ["Op", "Residuals", "Skeleton", "op", "registered_ops", "vjp"]

P = ParamSpec("P")
R = TypeVar("R")

registered_ops = _registry.registered_ops


def _flatten(saved: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[tuple[str, Skeleton], ...]]:
    arrays: dict[str, Any] = {}
    nested: list[tuple[str, Skeleton]] = []
    for key, value in saved.items():
        if isinstance(value, Residuals):
            arrays.update({f"{key}{_NEST}{name}": a for name, a in value.arrays.items()})
            nested.append((key, value.skeleton))
        else:
            arrays[key] = value
    return arrays, tuple(nested)


def _unflatten(res: Residuals) -> dict[str, Any]:
    saved: dict[str, Any] = {k: a for k, a in res.arrays.items() if _NEST not in k}
    for key, _ in res.nested:
        saved[key] = res.inner(key)
    return saved


def _arrays_only(value: Any) -> Any:
    """NumPy reductions to 0-d give scalars (``np.float64``); ops return 0-d arrays instead."""
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, dict):
        return {k: _arrays_only(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_arrays_only(v) for v in value)
    return value


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _matches(name: str, schema: Sequence[str]) -> bool:
    for entry in schema:
        if entry.endswith("*") and name.startswith(entry[:-1]):
            return True
        if name == entry.removesuffix("?"):
            return True
    return False


@functools.cache
def _inner_ops(uses: tuple[str, ...]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: _registry.lookup(name) for name in uses})


def _kw(kernel: Kernel) -> dict[str, Any]:
    """Keyword arguments a kernel's functions take besides the convention's: the ops it uses."""
    return {"ops": _inner_ops(kernel.uses)} if kernel.uses else {}


class Op(Generic[P, R]):
    """A public op: call it for the forward pass; ``fwd``/``bwd`` for training.

    Built by the :func:`op` decorator; see the module docstring.

    Parameters
    ----------
    prepare : callable
        Validates the arguments and returns a :class:`~arrayattn._kernel.Call`; its signature
        and docstring are the op's.
    differentiable, reference, residuals, adapt, examples
        As for :func:`op`.
    """

    def __init__(
        self,
        prepare: Callable[P, Call[R]],
        *,
        differentiable: Sequence[str],
        reference: Kernel,
        residuals: Sequence[str],
        adapt: Callable[[Kernel], Kernel] | None = None,
        examples: Callable[[Any], list[tuple[tuple, dict]]] | None = None,
    ):
        functools.update_wrapper(self, prepare)
        self.name: str = prepare.__name__
        self._prepare = prepare
        self.differentiable: tuple[str, ...] = tuple(differentiable)
        self.Grads: Any = NamedTuple(  # type: ignore[misc]
            f"{_camel(self.name)}Grads", [(arg, Any) for arg in self.differentiable]
        )
        self.Grads.__doc__ = (
            f"Gradients of {self.name} with respect to its differentiable arguments "
            f"({', '.join(self.differentiable)}); ``None`` for an argument that was not given."
        )
        self.reference = reference
        #: The names a kernel's residual record holds (``prefix*`` matches a family of names,
        #: ``name?`` is saved on some paths only).
        self.residuals: tuple[str, ...] = tuple(residuals)
        self._adapt = adapt
        self.examples = examples

    @property
    def composite(self) -> bool:
        """Whether the reference is glue around other ops (derived from the ops it uses).

        A composite op runs under any backend that accepts its inputs, its inner ops dispatching
        to that backend.
        """
        return bool(self.reference.uses)

    def adapt(self, kernel: Kernel) -> Kernel:
        """A backend's kernel in this op's own convention, adapted to the op protocol."""
        return kernel if self._adapt is None else self._adapt(kernel)

    def __repr__(self) -> str:
        return f"<arrayattn op {self.name}>"

    def __reduce__(self) -> str:  # ops pickle by reference, like functions
        return self.name

    # -- forward ---------------------------------------------------------------------------------

    def _run_forward(self, args: tuple, kwargs: dict, save: bool):
        call = self._prepare(*args, **kwargs)
        backend, kernel = _registry.resolve(self, call, get_backend())
        outs, saved = kernel.fwd(call.xp, dict(call.arrays), call.options, save, **_kw(kernel))
        outs = _arrays_only(tuple(outs))
        if len(outs) != len(call.outputs):
            raise AssertionError(f"{self.name}[{backend}] returned {len(outs)} outputs")
        if save:
            self._check_saved(backend, saved)
        return call, backend, outs, saved

    def _check_saved(self, backend: str, saved: Mapping[str, Any]) -> None:
        """Every backend fills in the op's residual schema (adapters rely on it)."""
        stray = [k for k in saved if not _matches(k, self.residuals)]
        missing = [k for k in self.residuals if k[-1] not in "*?" and k not in saved]
        if stray or missing:
            raise AssertionError(
                f"{self.name}[{backend}] residuals do not follow the op's schema "
                f"{self.residuals}: unexpected {stray}, missing {missing}"
            )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        call, _, outs, _ = self._run_forward(args, kwargs, save=False)
        return outs if len(call.outputs) > 1 else outs[0]

    def fwd(self, *args: P.args, **kwargs: P.kwargs) -> tuple[R, Residuals]:
        """Forward pass that also returns the :class:`Residuals` backward needs."""
        call, backend, outs, saved = self._run_forward(args, kwargs, save=True)
        arrays, nested = _flatten(saved)
        res = Residuals(
            op=self.name,
            backend=backend,
            arrays=arrays,
            options=call.options,
            nested=nested,
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

        Returns
        -------
        Grads
            A NamedTuple with one field per differentiable argument, ``None`` where that argument
            was not given.
        """
        if not isinstance(res, Residuals) or res.op != self.name:
            got = res.op if isinstance(res, Residuals) else type(res).__name__
            raise TypeError(f"res: expected the Residuals of {self.name}, got {got}")
        cts = self._check_cotangents(res, cotangents)
        kernel = _registry.kernel_for(self, res.backend)
        xp = array_api_compat.array_namespace(*[a for a in res.arrays.values() if a is not None])
        grads = kernel.bwd(xp, _unflatten(res), res.options, cts, **_kw(kernel))
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
        """Which backend would run this call and why each other backend would not.

        Parameters
        ----------
        *args, **kwargs
            The op's own arguments (nothing is computed).

        Returns
        -------
        str
            A report: the chosen backend, then one line per backend with its reasons.
        """
        return _registry.explain(self, self._prepare(*args, **kwargs), get_backend())


def op(
    *,
    differentiable: Sequence[str],
    reference: Kernel,
    residuals: Sequence[str],
    adapt: Callable[[Kernel], Kernel] | None = None,
    examples: Callable[[Any], list[tuple[tuple, dict]]] | None = None,
) -> Callable[[Callable[P, Call[R]]], Op[P, R]]:
    """Decorator turning a prepare function into a registered :class:`Op`.

    Parameters
    ----------
    differentiable : sequence of str
        The array arguments ``bwd`` gives gradients for, in signature order.
    reference : Kernel
        The array-API reference (from the family's glue module). If it declares ``uses``, the op
        is composite.
    residuals : sequence of str
        The names every backend's residual record holds (``"prefix*"`` for a family of names,
        ``"name?"`` for one saved on some paths only, e.g. by a dense fallback).
    adapt : callable, optional
        Turns a backend kernel written in the op's own convention into the op protocol (the
        family's glue); by default backends implement the op protocol directly.
    examples : callable, optional
        ``examples(rng) -> [(args, kwargs), ...]``: small float64 calls covering the options (for
        ``python -m arrayattn check`` and the kernel-conformance test).

    Returns
    -------
    callable
        The decorator: it registers and returns the :class:`Op`.
    """

    def wrap(prepare: Callable[P, Call[R]]) -> Op[P, R]:  # numpydoc ignore=GL08
        new: Op[P, R] = Op(
            prepare,
            differentiable=differentiable,
            reference=reference,
            residuals=residuals,
            adapt=adapt,
            examples=examples,
        )
        _registry.register(new)
        return new

    return wrap


def vjp(op: Op, *args: Any, **kwargs: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Run ``op`` forward; return ``(outputs, pullback)``, ``pullback(ct) == op.bwd(res, ct)``.

    Parameters
    ----------
    op : Op
        A registered op.
    *args, **kwargs
        Its arguments.

    Returns
    -------
    outputs : array or tuple of arrays
        What ``op(*args, **kwargs)`` returns.
    pullback : callable
        ``pullback(cotangents)`` gives the gradients (``op.bwd`` with the saved residuals).

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

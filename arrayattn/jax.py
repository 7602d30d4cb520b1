"""JAX adapter: every arrayattn op as a ``jax.custom_vjp`` function.

``arrayattn.jax.<op>`` exists for every public op (:func:`arrayattn.registered_ops`), generated on
first access, and takes the op's own arguments with JAX arrays (a parameter mapping such as
``params`` is a ``dict`` of arrays, a pytree). It works under :func:`jax.jit`, :func:`jax.grad`
and :func:`jax.vmap`; the gradient is the op's hand-derived ``.bwd``, not JAX's autodiff of the
forward::

    import jax, jax.numpy as jnp
    import arrayattn.jax as aaj

    loss = lambda q: aaj.scaled_dot_product_attention(q, q, q, causal=True).sum()
    g = jax.jit(jax.grad(loss))(jnp.ones((2, 4, 16, 8)))

Notes
-----
``use_callback=False`` (default)
    The op's array-API reference runs on the JAX arrays themselves: it is traced like any JAX
    code, so it runs on whatever device JAX uses and XLA compiles it under ``jit``. The backend
    setting is not consulted (the reference is the only backend for JAX arrays).
``use_callback=True``
    Forward and backward run on the host through :func:`jax.pure_callback` on NumPy arrays, with
    the backend the setting selects when the function is called (``numba`` where it has a kernel):
    useful for CPU speed. Output shapes come from tracing the reference abstractly
    (:func:`jax.eval_shape`); backward runs the forward again inside its callback to rebuild the
    residuals (JAX keeps the inputs and outputs), so it costs one more forward. Under ``vmap``
    the callback runs once per batch element (``vmap_method="sequential"``).

Options that are not arrays (``causal``, ``scale``, ``num_heads``, ...) are static: they are
bound into the function, not traced, and must be hashable.

Examples
--------
>>> import jax, jax.numpy as jnp, arrayattn.jax as aaj
>>> q = jnp.ones((1, 2, 5, 4))
>>> aaj.scaled_dot_product_attention(q, q, q, causal=True).shape
(1, 2, 5, 4)
>>> g = jax.grad(lambda q: aaj.scaled_dot_product_attention(q, q, q).sum())(q)
>>> g.shape
(1, 2, 5, 4)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _op
from ._adapt import array_leaves, call_arguments, generated_module, leaf_of
from ._config import get_backend, use_backend

__all__: list[str] = []  # the ops are generated: see __dir__ / arrayattn.registered_ops()


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


class _Static:
    """The non-array part of a Residuals record (its skeleton), as a leafless pytree node."""

    def __init__(self, skeleton: _op.Skeleton):
        self.skeleton = skeleton


jax.tree_util.register_pytree_node(
    _Static,
    lambda s: ((), s.skeleton),
    lambda aux, _: _Static(aux),
)


def _zero_cotangent(x: Any) -> Any:
    """The cotangent of an input that gets no gradient (float0 for bool and integer arrays)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _as_cotangents(outs: tuple, cts: Any) -> Any:
    cts = cts if isinstance(cts, tuple) else (cts,)
    fixed = tuple(None if c.dtype == jax.dtypes.float0 else c for c in cts)
    return fixed if len(outs) > 1 else fixed[0]


def _gradients(op: _op.Op, leaves: tuple, arrays: tuple, grads: Any, to_zero: Callable) -> tuple:
    result = []
    for (name, key), x in zip(leaves, arrays, strict=True):
        g = leaf_of(getattr(grads, name, None), key) if name in op.differentiable else None
        result.append(to_zero(x) if g is None else g)
    return tuple(result)


@functools.lru_cache(maxsize=1024)
def _function(name: str, leaves: tuple, options: tuple, use_callback: bool, setting: str | None):
    """The custom_vjp function of the leaves for one (op, argument structure, options) key."""
    op = _op.registered_ops()[name]

    def reference(*arrays):
        args, kwargs = call_arguments(op, leaves, options, arrays)
        with use_backend("array_api"):
            return op(*args, **kwargs)

    if not use_callback:

        @jax.custom_vjp
        def f(*arrays):
            return reference(*arrays)

        def f_fwd(*arrays):
            args, kwargs = call_arguments(op, leaves, options, arrays)
            with use_backend("array_api"):
                out, res = op.fwd(*args, **kwargs)
            return out, (dict(res.arrays), _Static(res.skeleton), arrays)

        def f_bwd(saved, cts):
            res_arrays, static, arrays = saved
            res = _op.Residuals.from_skeleton(static.skeleton, res_arrays)
            outs = tuple(n for n, _, _ in static.skeleton.outputs)
            grads = op.bwd(res, _as_cotangents(outs, cts))
            return _gradients(op, leaves, arrays, grads, _zero_cotangent)

        f.defvjp(f_fwd, f_bwd)
        return f

    # -- host callbacks into the NumPy backends ------------------------------------------------

    def host_forward(*arrays):
        args, kwargs = call_arguments(op, leaves, options, tuple(np.asarray(a) for a in arrays))
        with use_backend(setting):
            out = op(*args, **kwargs)
        return tuple(np.asarray(o) for o in (out if isinstance(out, tuple) else (out,)))

    def host_backward(arrays, cts):
        arrays = tuple(np.asarray(a) for a in arrays)
        args, kwargs = call_arguments(op, leaves, options, arrays)
        with use_backend(setting):
            out, res = op.fwd(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        cts = tuple(None if c is None else np.asarray(c) for c in cts)
        grads = op.bwd(res, cts if len(outs) > 1 else cts[0])
        result = _gradients(op, leaves, arrays, grads, lambda x: np.zeros(x.shape, x.dtype))
        return tuple(
            np.asarray(g) for (nm, _), g in zip(leaves, result, strict=True) if _diff(op, nm)
        )

    def out_shapes(*arrays):
        out = jax.eval_shape(reference, *arrays)
        return out if isinstance(out, tuple) else (out,)

    def run_forward(*arrays):
        shapes = out_shapes(*arrays)
        outs = jax.pure_callback(host_forward, shapes, *arrays, vmap_method="sequential")
        return outs if len(outs) > 1 else outs[0]

    @jax.custom_vjp
    def g(*arrays):
        return run_forward(*arrays)

    def g_fwd(*arrays):
        out = run_forward(*arrays)
        return out, arrays

    def g_bwd(arrays, cts):
        cts = cts if isinstance(cts, tuple) else (cts,)
        float_cts = tuple(c for c in cts if c.dtype != jax.dtypes.float0)
        mask = tuple(c.dtype != jax.dtypes.float0 for c in cts)

        def host(arrays, float_cts):
            it = iter(float_cts)
            return host_backward(arrays, tuple(next(it) if m else None for m in mask))

        shapes = tuple(
            jax.ShapeDtypeStruct(x.shape, x.dtype)
            for (nm, _), x in zip(leaves, arrays, strict=True)
            if _diff(op, nm)
        )
        grads = iter(jax.pure_callback(host, shapes, arrays, float_cts, vmap_method="sequential"))
        return tuple(
            next(grads) if _diff(op, nm) else _zero_cotangent(x)
            for (nm, _), x in zip(leaves, arrays, strict=True)
        )

    g.defvjp(g_fwd, g_bwd)
    return g


def _diff(op: _op.Op, name: str) -> bool:
    return name in op.differentiable


def _make_wrapper(op: _op.Op) -> Callable[..., Any]:
    sig = inspect.signature(op)
    positional = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    def wrapper(*args: Any, use_callback: bool = False, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(
                f"{op.name}() takes {len(positional)} positional arguments but {len(args)} were "
                "given"
            )
        # args may be fewer than the positional parameters (the rest given by keyword)
        arguments = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():
            if key in arguments:
                raise TypeError(f"{op.name}() got multiple values for argument {key!r}")
            arguments[key] = value
        leaves: list[tuple[str, str | int | None]] = []
        arrays: list[Any] = []
        options: list[tuple[str, Any]] = []
        for name, value in arguments.items():
            found = array_leaves(name, value, _is_array)
            for leaf_key, v in found or []:
                leaves.append((name, leaf_key))
                arrays.append(v)
            if found is None:
                try:
                    hash(value)
                except TypeError:
                    raise TypeError(
                        f"{name}: arrayattn.jax binds options statically, so they must be "
                        "hashable; "
                        f"got {type(value).__name__}"
                    ) from None
                options.append((name, value))
        arrays = [jnp.asarray(a) for a in arrays]
        setting = get_backend() if use_callback else None
        f = _function(op.name, tuple(leaves), tuple(options), bool(use_callback), setting)
        return f(*arrays)

    wrapper.__name__ = wrapper.__qualname__ = op.name
    wrapper.__module__ = __name__
    params = list(sig.parameters.values())
    extra = inspect.Parameter("use_callback", inspect.Parameter.KEYWORD_ONLY, default=False)
    insert = next(
        (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params)
    )
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params[:insert] + [extra] + params[insert:],
        return_annotation=inspect.Signature.empty,
    )
    wrapper.__doc__ = (
        f"JAX version of :func:`arrayattn.{op.name}`: the same arguments, with JAX arrays.\n\n"
        f"A ``jax.custom_vjp`` function (gradients for {', '.join(op.differentiable) or 'nothing'} "
        "from the op's ``.bwd``) that works under ``jit``, ``grad`` and ``vmap``; "
        "``use_callback=True`` runs the NumPy backends through ``jax.pure_callback``. "
        "See :mod:`arrayattn.jax`.\n"
    )
    return wrapper


__getattr__, __dir__ = generated_module("arrayattn.jax", globals(), _make_wrapper)

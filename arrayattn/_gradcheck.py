"""Finite-difference checks of an op's backward pass (float64 NumPy), used by tests and ``check``.

Two checks, both on the scalar ``f(x) = Σ_outputs <ct, op(x)>`` with random cotangents ``ct``:

* :func:`directional_errors` — the dot-product test ``<J^T ct, u> = <ct, J u>`` for a random
  direction ``u`` per differentiable argument, ``J u`` by central differences;
* :func:`numerical_gradient` — every entry of one argument's gradient by central differences.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._adapt import array_leaves, leaf_of, with_leaf
from ._op import Op

__all__ = ["differentiable_leaves", "directional_errors", "numerical_gradient", "random_cotangents"]


def _bind(op: Op, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(op).bind(*args, **kwargs)


def differentiable_leaves(
    op: Op, args: tuple, kwargs: dict
) -> Iterator[tuple[str, str | int | None]]:
    """(argument, key) for every differentiable array given; key is None for a plain array, the
    key of a params dict, or the position in a sequence of arrays."""
    bound = _bind(op, args, kwargs).arguments
    for name in op.differentiable:
        for key, _ in array_leaves(name, bound.get(name), _is_array) or []:
            yield name, key


def _is_array(x: Any) -> bool:
    # NumPy scalars have a shape and a dtype too, but are options (e.g. a size), not arrays.
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.generic)


def _get(bound: dict, leaf: tuple[str, str | int | None]) -> np.ndarray:
    name, key = leaf
    return leaf_of(bound[name], key)


def _replaced(op: Op, args: tuple, kwargs: dict, leaf, value) -> tuple[tuple, dict]:
    bound = _bind(op, args, kwargs)
    name, key = leaf
    bound.arguments[name] = with_leaf(bound.arguments[name], key, value)
    return bound.args, bound.kwargs


def random_cotangents(outputs: Any, rng: np.random.Generator) -> Any:
    if isinstance(outputs, tuple):
        return tuple(random_cotangents(o, rng) for o in outputs)
    return rng.standard_normal(outputs.shape).astype(outputs.dtype)


def _pairing(outputs: Any, cts: Any) -> float:
    if isinstance(outputs, tuple):
        return sum(_pairing(o, c) for o, c in zip(outputs, cts, strict=True))
    o = np.asarray(outputs, dtype=np.float64)
    c = np.asarray(cts, dtype=np.float64)
    finite = np.isfinite(o)  # +inf logsumexp of an empty row carries no gradient
    return float(np.sum(np.where(finite, o, 0.0) * c))


def _grad_of(grads: Any, leaf) -> np.ndarray:
    name, key = leaf
    return leaf_of(getattr(grads, name), key)


def directional_errors(
    op: Op, args: tuple, kwargs: dict, *, rng: np.random.Generator, eps: float = 1e-6
) -> dict[str, float]:
    """Relative error of the dot-product test for every differentiable leaf (float64 inputs)."""
    out, res = op.fwd(*args, **kwargs)
    cts = random_cotangents(out, rng)
    grads = op.bwd(res, cts)
    bound = _bind(op, args, kwargs).arguments
    errors = {}
    for leaf in differentiable_leaves(op, args, kwargs):
        x = np.asarray(_get(bound, leaf))
        u = rng.standard_normal(x.shape)
        values = []
        for sign in (1.0, -1.0):
            a, kw = _replaced(op, args, kwargs, leaf, x + sign * eps * u)
            values.append(_pairing(op(*a, **kw), cts))
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = float(np.sum(np.asarray(_grad_of(grads, leaf), dtype=np.float64) * u))
        scale = max(abs(fd), abs(analytic), 1e-8)
        errors[leaf[0] if leaf[1] is None else f"{leaf[0]}[{leaf[1]!r}]"] = (
            abs(fd - analytic) / scale
        )
    return errors


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, *, eps: float = 1e-6
) -> np.ndarray:
    """Central-difference gradient of a scalar function ``f`` at ``x`` (float64, entry by entry)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        fp = f(x.copy())
        flat[i] = orig - eps
        fm = f(x.copy())
        flat[i] = orig
        gflat[i] = (fp - fm) / (2 * eps)
    return grad

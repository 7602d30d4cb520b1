"""Pieces both framework adapters (``arrayattn.torch``, ``arrayattn.jax``) build their ops from.

An op's array arguments come in three structures, each flattened to *leaves* ``(name, key)``:
an array (key ``None``), a parameter mapping (key: the mapping's key) and a sequence of arrays,
e.g. ``merge_attention``'s ``outs`` (key: the position, an ``int``). :func:`array_leaves`,
:func:`leaf_of` and :func:`with_leaf` are the only code that knows these structures; the adapters,
the finite-difference checks and :mod:`arrayattn.dask` go through them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _op

__all__ = ["array_leaves", "call_arguments", "generated_module", "leaf_of", "with_leaf"]

Key = str | int | None


def array_leaves(
    name: str, value: Any, is_array: Callable[[Any], bool]
) -> list[tuple[Key, Any]] | None:
    """The ``(key, array)`` leaves of one argument, or ``None`` when it holds no array (an option).

    ``None`` entries of a mapping are skipped; any other non-array entry of a mapping or sequence
    that holds arrays is a ``TypeError`` naming it.
    """
    if is_array(value):
        return [(None, value)]
    if isinstance(value, Mapping):
        items = [(k, v) for k, v in value.items() if v is not None]
    elif isinstance(value, (tuple, list)):
        items = list(enumerate(value))
    else:
        return None
    if not any(is_array(v) for _, v in items):
        return None
    for k, v in items:
        if not is_array(v):
            raise TypeError(f"{name}[{k!r}]: expected an array, got {type(v).__name__}")
    return items


def leaf_of(value: Any, key: Key) -> Any:
    """Leaf ``key`` of an argument (or of its gradient); ``None`` where a mapping lacks it."""
    if key is None or value is None:
        return value
    if isinstance(value, Mapping):
        return value.get(key)
    return value[key]


def with_leaf(value: Any, key: Key, leaf: Any) -> Any:
    """A copy of an argument's value with leaf ``key`` replaced (the leaf itself for ``None``)."""
    if key is None:
        return leaf
    if isinstance(value, Mapping):
        return {**value, key: leaf}
    return tuple(leaf if i == key else v for i, v in enumerate(value))


def call_arguments(
    op: _op.Op, leaves: Iterable[tuple[str, str | None]], options: Iterable, arrays: Iterable
) -> tuple[list, dict]:
    """(args, kwargs) of ``op`` with the arrays put back where they came from.

    ``leaves`` names each array's argument (and key, for a parameter mapping); ``options`` are the
    (name, value) pairs of the other arguments.
    """
    arguments: dict[str, Any] = dict(options)
    for (name, key), a in zip(leaves, arrays, strict=True):
        if key is None:
            arguments[name] = a
        else:
            arguments.setdefault(name, {})[key] = a
    for name, value in arguments.items():  # a sequence's leaves are keyed by position
        if isinstance(value, dict) and value and all(type(k) is int for k in value):
            arguments[name] = tuple(value[i] for i in range(len(value)))
    args, kwargs = [], {}
    for p in inspect.signature(op).parameters.values():
        if p.name not in arguments:
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(arguments.pop(p.name))
        elif p.kind is not inspect.Parameter.VAR_KEYWORD:
            kwargs[p.name] = arguments.pop(p.name)
    kwargs.update(arguments)  # **kwargs of the op, if it has them
    return args, kwargs


def generated_module(
    module: str, module_globals: dict, make_wrapper: Callable[[_op.Op], Callable[..., Any]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` exposing one wrapper per registered op.

    Wrappers are built on first access and memoised, so ops registered later are covered too.
    """
    wrappers: dict[str, Callable[..., Any]] = {}

    def __getattr__(name: str) -> Callable[..., Any]:
        ops = _op.registered_ops()
        if name not in ops:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in wrappers:
            wrappers[name] = make_wrapper(ops[name])
        return wrappers[name]

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(_op.registered_ops()))

    return __getattr__, __dir__

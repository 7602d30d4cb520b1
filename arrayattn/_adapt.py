"""Pieces both framework adapters (``arrayattn.torch``, ``arrayattn.jax``) build their ops from."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from . import _op

__all__ = ["call_arguments", "generated_module"]


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

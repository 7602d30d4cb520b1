"""The backend setting.

One ``ContextVar`` holds the backend chosen in the current context, so a setting made in one thread
or asyncio task never leaks into another. Precedence, highest first: :func:`use_backend` (a context
manager), :func:`set_backend`, the ``ARRAYATTN_BACKEND`` environment variable, ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from ._registry import backend_names

__all__ = ["ENV_VAR", "get_backend", "set_backend", "setting_names", "use_backend"]

ENV_VAR = "ARRAYATTN_BACKEND"

# Two layers in one variable would make `use_backend` inside `set_backend` ambiguous to undo, so the
# context manager keeps its own variable and `set_backend` keeps the other.
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "arrayattn_scoped", default=None
)
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "arrayattn_chosen", default=None
)


def setting_names() -> tuple[str, ...]:
    """Every name the setting accepts: ``"auto"`` and the backends of the registry.

    Returns
    -------
    tuple of str
    """
    return ("auto", *backend_names())


def _validate(name: object, source: str) -> str:
    names = setting_names()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, names))}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for the current context (thread or asyncio task).

    Parameters
    ----------
    name : str
        ``"auto"`` (the fastest eligible backend for each call, falling back to ``"array_api"``) or
        one of ``"array_api"``, ``"numba"``, ``"cupy"``, ``"numba_cuda"``. An explicitly chosen
        backend that cannot run a call raises :class:`arrayattn.BackendError`; it never silently
        falls back.

    Examples
    --------
    >>> import arrayattn as aa
    >>> aa.set_backend("array_api")
    >>> aa.get_backend()
    'array_api'
    >>> aa.set_backend("auto")
    """
    _chosen.set(_validate(name, "set_backend(name)"))


def get_backend() -> str:
    """Return the backend setting in force here (``"auto"`` unless something chose another).

    Returns
    -------
    str
        ``"auto"`` or a backend name.

    Examples
    --------
    >>> import arrayattn as aa
    >>> with aa.use_backend("array_api"):
    ...     aa.get_backend()
    'array_api'
    """
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env.strip(), f"environment variable {ENV_VAR}")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that sets the backend inside its block and restores the previous setting.

    Parameters
    ----------
    name : str
        As for :func:`set_backend`.

    Examples
    --------
    >>> import numpy as np, arrayattn as aa
    >>> q = np.ones((2, 4, 8))
    >>> with aa.use_backend("array_api"):
    ...     out = aa.scaled_dot_product_attention(q, q, q)
    >>> out.shape
    (2, 4, 8)
    """
    token = _scoped.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _scoped.reset(token)

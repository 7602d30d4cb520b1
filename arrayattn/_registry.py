"""Backends, their availability, and the resolution of a call to one backend's kernel.

A backend is a module of kernels (``KERNELS: dict[op name, Kernel]``) imported only when a call
could run on it, so ``import arrayattn`` imports neither numba nor cupy. Resolution collects the
reason every rejected backend gives, so an error (or :func:`explain`) says why each was passed over.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ._config import get_backend
from ._op import Call, Kernel, Op
from ._xp import namespace_name

__all__ = ["BackendError", "BackendInfo", "backends", "explain", "kernel_for", "resolve"]


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot run a call (the message lists every backend's reason)."""


@dataclass(frozen=True)
class _Backend:
    name: str
    description: str
    module: str | None  # the module holding KERNELS; None for the reference
    namespaces: tuple[str, ...] | None  # array namespaces it accepts; None = any
    probe: Callable[[], str | None]  # why it is unavailable in this process, or None


def _probe_numba() -> str | None:
    try:
        import numba  # noqa: F401
    except Exception as exc:  # ImportError, or a numba/numpy version mismatch
        return f"numba cannot be imported ({exc}); install the 'numba' extra"
    return None


def _probe_cupy() -> str | None:
    try:
        import cupy
    except Exception as exc:
        return f"cupy cannot be imported ({exc}); install the 'cuda12' or 'cuda13' extra"
    try:
        if not cupy.cuda.is_available():
            return "cupy is installed but no CUDA device is visible"
    except Exception as exc:
        return f"cupy cannot reach the CUDA driver ({exc})"
    return None


def _probe_numba_cuda() -> str | None:
    try:
        from numba import cuda
    except Exception as exc:
        return f"numba.cuda cannot be imported ({exc}); install the 'cuda12' or 'cuda13' extra"
    try:
        if not cuda.is_available():
            return "numba.cuda is installed but no CUDA device is visible"
    except Exception as exc:
        return f"numba.cuda cannot reach the CUDA driver ({exc})"
    return None


# In the order `auto` tries them; array_api is last because it always accepts.
_BACKENDS: dict[str, _Backend] = {
    b.name: b
    for b in (
        _Backend(
            "cupy",
            "CUDA C kernels (cupy.RawModule) for CuPy arrays",
            "arrayattn.backends.cupy",
            ("cupy",),
            _probe_cupy,
        ),
        _Backend(
            "numba_cuda",
            "@cuda.jit kernels for CuPy arrays",
            "arrayattn.backends.numba_cuda",
            ("cupy",),
            _probe_numba_cuda,
        ),
        _Backend(
            "numba",
            "fused parallel CPU kernels (@njit) for NumPy arrays",
            "arrayattn.backends.numba",
            ("numpy",),
            _probe_numba,
        ),
        _Backend(
            "array_api",
            "the reference: plain array-API code, runs on any namespace",
            None,
            None,
            lambda: None,
        ),
    )
}


@functools.cache
def _unavailable(name: str) -> str | None:
    return _BACKENDS[name].probe()


@functools.cache
def _kernels(name: str) -> dict[str, Kernel]:
    module = importlib.import_module(_BACKENDS[name].module)
    return dict(getattr(module, "KERNELS", {}))


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str | None
    description: str
    ops: tuple[str, ...] | None  # ops with a kernel here (None while unavailable)


def backends() -> list[BackendInfo]:
    """Every backend, whether it is available in this process, why not, and the ops it covers.

    Examples
    --------
    >>> import arrayattn as aa
    >>> [b.name for b in aa.backends()]
    ['cupy', 'numba_cuda', 'numba', 'array_api']
    >>> aa.backends()[-1].available
    True
    """
    from ._op import registered_ops

    info = []
    for b in _BACKENDS.values():
        reason = _unavailable(b.name)
        ops: tuple[str, ...] | None = None
        if reason is None:
            if b.module is None:
                ops = tuple(registered_ops())
            else:
                try:
                    ops = tuple(name for name in registered_ops() if name in _kernels(b.name))
                except Exception as exc:
                    reason = f"{b.module} failed to import ({exc})"
        info.append(BackendInfo(b.name, reason is None, reason, b.description, ops))
    return info


def _rejection(name: str, op: Op, call: Call) -> tuple[str | None, Kernel | None]:
    """(reason backend ``name`` cannot run ``call``, or None; its kernel when it can)."""
    b = _BACKENDS[name]
    if b.namespaces is not None:
        ns = namespace_name(call.xp)
        if ns not in b.namespaces:
            return f"takes {' or '.join(b.namespaces)} arrays, got {ns} arrays", None
    reason = _unavailable(name)
    if reason is not None:
        return reason, None
    if b.module is None:
        kernel = op.reference
    else:
        try:
            kernel = _kernels(name).get(op.name)
        except Exception as exc:
            return f"{b.module} failed to import ({exc})", None
        if kernel is None:
            if op.composite:  # the glue runs here; its inner ops dispatch to this backend
                return None, op.reference
            return f"has no kernel for {op.name}", None
    reason = kernel.supports(call)
    return reason, (None if reason else kernel)


def _candidates(setting: str) -> list[str]:
    return list(_BACKENDS) if setting == "auto" else [setting]


def resolve(op: Op, call: Call) -> tuple[str, Kernel]:
    """The backend and kernel that run ``call`` under the current setting."""
    setting = get_backend()
    for name in _candidates(setting):
        reason, kernel = _rejection(name, op, call)
        if reason is None:
            return name, kernel
    raise BackendError(
        f"backend {setting!r} cannot run {op.name} on these inputs:\n" + _report(op, call)
    )


def _report(op: Op, call: Call) -> str:
    lines = []
    for name in _BACKENDS:
        reason, _ = _rejection(name, op, call)
        lines.append(f"  {name}: {'eligible' if reason is None else reason}")
    return "\n".join(lines)


def explain(op: Op, call: Call) -> str:
    """A report of the backend that would run ``call`` and why every other one would not."""
    setting = get_backend()
    try:
        chosen, _ = resolve(op, call)
        head = f"{op.name}: setting {setting!r} -> backend {chosen!r}"
    except BackendError:
        head = f"{op.name}: setting {setting!r} -> no backend can run this call"
    return head + "\n" + _report(op, call)


def kernel_for(op: Op, backend: str) -> Kernel:
    """The kernel of ``op`` on ``backend`` (for backward, which runs where forward ran)."""
    kernel = op.reference if backend == "array_api" else _kernels(backend).get(op.name)
    if kernel is None and op.composite:
        kernel = op.reference
    return kernel

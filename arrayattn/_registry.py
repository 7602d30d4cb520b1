"""The op table, the backends, and the resolution of a call to one backend's kernel.

Backends are discovered: every subpackage of :mod:`arrayattn.backends` declares
``BACKEND = BackendSpec(...)`` in its ``__init__`` (which imports nothing heavy), and each of its
public modules holds ``KERNELS: dict[op name, Kernel]``. Kernel modules are imported only when a
call could run on that backend, so ``import arrayattn`` imports neither numba nor cupy. The
reference backend ``array_api`` is built in: it runs every op's reference kernel.

Resolution collects every reason each rejected backend gives, so an error (or :func:`explain`)
says why each was passed over. This module imports no other layer of the package but the
:mod:`arrayattn._kernel` leaf; the setting in force is passed in by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ._kernel import Call, Kernel
from ._xp import namespace_name

if TYPE_CHECKING:
    from ._op import Op

__all__ = [
    "REFERENCE",
    "BackendError",
    "BackendInfo",
    "BackendSpec",
    "backend_names",
    "backends",
    "explain",
    "support_table",
    "kernel_for",
    "kernels",
    "lookup",
    "register",
    "registered_ops",
    "resolve",
]

#: The name of the built-in reference backend.
REFERENCE = "array_api"


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot run a call (the message lists every backend's reason)."""


@dataclass(frozen=True)
class BackendSpec:
    """What a backend package declares about itself (``BACKEND`` in its ``__init__``).

    ``namespaces``: the array namespaces it accepts (``None``: any); ``probe()``: why it is
    unavailable in this process, or ``None``; ``priority``: ``auto`` tries higher first.
    """

    name: str
    description: str
    namespaces: tuple[str, ...] | None
    probe: Callable[[], str | None]
    priority: int = 0
    module: str | None = None  # filled in by discovery


# -- ops ---------------------------------------------------------------------------------------

_OPS: dict[str, Op] = {}


def register(op: Op) -> None:
    """Add ``op`` to the table of public ops (an op name is registered once)."""
    if op.name in _OPS:
        raise RuntimeError(f"op {op.name!r} registered twice")
    _OPS[op.name] = op


def registered_ops() -> dict[str, Op]:
    """Every public op, by name, in registration order.

    Examples
    --------
    >>> import arrayattn as aa
    >>> "scaled_dot_product_attention" in aa.registered_ops()
    True
    """
    return dict(_OPS)


def lookup(name: str) -> Op:
    """The registered op called ``name`` (how composite kernels reach the ops they use)."""
    return _OPS[name]


# -- backends ------------------------------------------------------------------------------------

_REFERENCE_SPEC = BackendSpec(
    REFERENCE,
    "the reference: plain array-API code, runs on any namespace",
    None,
    lambda: None,
    priority=-(10**9),
)


@functools.cache
def _specs() -> dict[str, BackendSpec]:
    """Every backend, in the order ``auto`` tries them (the reference last: it always accepts)."""
    from . import backends as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or not info.ispkg:
            continue
        name = f"{package.__name__}.{info.name}"
        spec = getattr(importlib.import_module(name), "BACKEND", None)
        if isinstance(spec, BackendSpec):
            found.append(dataclasses.replace(spec, module=name))
    found.append(_REFERENCE_SPEC)
    found.sort(key=lambda s: -s.priority)
    return {s.name: s for s in found}


def backend_names() -> tuple[str, ...]:
    """Names of every backend, in the order ``auto`` tries them."""
    return tuple(_specs())


@functools.cache
def _unavailable(name: str) -> str | None:
    return _specs()[name].probe()


def _kernel_modules(package: str) -> Iterator[Any]:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{package}.{info.name}")


@functools.cache
def _backend_kernels(name: str) -> dict[str, Kernel]:
    """The raw kernels a backend declares (``KERNELS`` of its modules), by op name."""
    table: dict[str, Kernel] = {}
    for module in _kernel_modules(_specs()[name].module or ""):
        for op_name, kernel in getattr(module, "KERNELS", {}).items():
            if op_name in table:
                raise RuntimeError(f"backend {name}: two kernels for {op_name}")
            table[op_name] = kernel
    return table


def kernels(name: str) -> dict[str, Kernel]:
    """The kernels of backend ``name`` by op name, adapted to the op protocol by each op's glue.

    Raises whatever importing the backend's modules raises (the backend must be available).
    """
    if name == REFERENCE:
        return {op_name: op.reference for op_name, op in _OPS.items()}
    return _adapted(name)


@functools.cache
def _adapted(name: str) -> dict[str, Kernel]:
    raw = _backend_kernels(name)
    unknown = sorted(set(raw) - set(_OPS))
    if unknown:
        raise RuntimeError(f"backend {name} declares kernels for unknown ops {unknown}")
    return {op_name: _OPS[op_name].adapt(kernel) for op_name, kernel in raw.items()}


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
    info = []
    for spec in _specs().values():
        reason = _unavailable(spec.name)
        ops: tuple[str, ...] | None = None
        if reason is None:
            try:
                table = kernels(spec.name)
                ops = tuple(name for name in _OPS if name in table)
            except Exception as exc:
                reason = f"{spec.module} failed to import ({exc})"
        info.append(BackendInfo(spec.name, reason is None, reason, spec.description, ops))
    return info


# -- resolution ----------------------------------------------------------------------------------


def _rejection(name: str, op: Op, call: Call) -> tuple[list[str], Kernel | None]:
    """(reasons backend ``name`` cannot run ``call``, empty if it can; its kernel when it can)."""
    spec = _specs()[name]
    if spec.namespaces is not None:
        ns = namespace_name(call.xp)
        if ns not in spec.namespaces:
            return [f"takes {' or '.join(spec.namespaces)} arrays, got {ns} arrays"], None
    reason = _unavailable(name)
    if reason is not None:
        return [reason], None
    try:
        kernel = kernels(name).get(op.name)
    except Exception as exc:
        return [f"{spec.module} failed to import ({exc})"], None
    if kernel is None:
        if not op.composite:
            return [f"has no kernel for {op.name}"], None
        # The reference's glue runs here and its inner ops dispatch to this backend.
        kernel = op.reference
    reasons = kernel.not_supported_reasons(call)
    return reasons, (None if reasons else kernel)


def _candidates(setting: str) -> list[str]:
    return list(_specs()) if setting == "auto" else [setting]


def resolve(op: Op, call: Call, setting: str) -> tuple[str, Kernel]:
    """The backend and kernel that run ``call`` under ``setting`` (a name or ``"auto"``)."""
    for name in _candidates(setting):
        reasons, kernel = _rejection(name, op, call)
        if kernel is not None:
            return name, kernel
    raise BackendError(
        f"backend {setting!r} cannot run {op.name} on these inputs:\n" + _report(op, call)
    )


def _report(op: Op, call: Call) -> str:
    lines = []
    for name in _specs():
        reasons, _ = _rejection(name, op, call)
        lines.append(f"  {name}: {'; '.join(reasons) if reasons else 'eligible'}")
    return "\n".join(lines)


def explain(op: Op, call: Call, setting: str) -> str:
    """A report of the backend that would run ``call`` and why every other one would not."""
    try:
        chosen, _ = resolve(op, call, setting)
        head = f"{op.name}: setting {setting!r} -> backend {chosen!r}"
    except BackendError:
        head = f"{op.name}: setting {setting!r} -> no backend can run this call"
    return head + "\n" + _report(op, call)


def kernel_for(op: Op, backend: str) -> Kernel:
    """The kernel of ``op`` on ``backend`` (for backward, which runs where forward ran)."""
    kernel = kernels(backend).get(op.name)
    if kernel is None and op.composite:
        kernel = op.reference
    if kernel is None:
        raise BackendError(f"backend {backend!r} has no kernel for {op.name}")
    return kernel


def _describe(kernel: Kernel) -> str:
    parts = ["any floating dtype" if kernel.dtypes is None else ", ".join(kernel.dtypes)]
    parts += [req.what for req in kernel.requires]
    if not kernel.deterministic:
        parts.append("not deterministic")
    return "; ".join(parts)


def support_table() -> tuple[list[str], list[list[str]]]:
    """(header, rows): what every backend declares it runs, op by op (from the declarations).

    A cell gives the dtypes and requirements of the backend's kernel, ``composite`` where the op
    runs its reference glue there with its inner ops on that backend, and ``-`` where the backend
    has no kernel. The declarations are read without importing numba or cupy.
    """
    names = [n for n in backend_names() if n != REFERENCE]
    declared: dict[str, dict[str, Kernel] | Exception] = {}
    for name in names:
        try:
            declared[name] = _backend_kernels(name)
        except Exception as exc:  # a backend whose declarations cannot even be imported here
            declared[name] = exc
    rows = []
    for op_name, op in _OPS.items():
        row = [op_name, _describe(op.reference)]
        for name in names:
            table = declared[name]
            if isinstance(table, Exception):
                row.append("?")
            elif op_name in table:
                row.append(_describe(table[op_name]))
            else:
                row.append("composite" if op.composite else "-")
        rows.append(row)
    return ["op", REFERENCE, *names], rows

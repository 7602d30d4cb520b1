"""What ops, their glue and the backends share: a validated call and a kernel with its capabilities.

This module is a leaf of the package (it imports nothing from arrayattn but ``_xp``), so every
layer may use it: the public ops build :class:`Call` records, the glue layer adapts kernels,
and the backends declare :class:`Kernel` objects with what they can run.

A kernel's ``fwd``/``bwd`` follow the *op's kernel convention*::

    fwd(xp, arrays, options, save) -> (outputs tuple, saved mapping)
    bwd(xp, saved, options, cotangents tuple) -> {argument name: gradient}

unless the op's glue declares a narrower convention of its own (scaled dot-product attention's
``forward(q, k, v, *, mask, ...)`` pair, for instance) and adapts it: the glue module of the
family documents it, and a backend provides functions in that convention.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Generic, NamedTuple, TypeVar

from ._xp import Array

__all__ = [
    "DEFAULT_RTOL",
    "Call",
    "Kernel",
    "NoOptions",
    "Options",
    "Requirement",
    "Residuals",
    "Skeleton",
    "dtype_name",
    "requirement",
]

R = TypeVar("R")


@dataclass(frozen=True)
class Options:
    """Base of the per-op option records: frozen (hashable) dataclasses of normalised options.

    Each op declares a subclass in its family's glue module; kernels read its fields by name.
    """

    def items(self) -> tuple[tuple[str, Hashable], ...]:
        """The fields as ``(name, value)`` pairs, in declaration order."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class NoOptions(Options):
    """The options of an op that has none."""


@dataclass(frozen=True)
class Call(Generic[R]):
    """A validated call of an op.

    ``arrays`` holds every array argument by name (``None`` where not given; a parameter mapping
    is a ``dict`` of arrays under its argument name, a pair of tables a ``tuple``). ``options``
    holds the normalised options (an :class:`Options` record). ``outputs`` names the outputs;
    more than one name means the op returns a tuple. The type parameter is what the op returns.
    """

    xp: Any
    arrays: Mapping[str, Any]
    options: Options
    outputs: tuple[str, ...] = ("out",)

    @property
    def dtype(self) -> Any:
        """The dtype of the first array argument: the dtype the op computes in."""
        return next(a for a in self.arrays.values() if a is not None and hasattr(a, "dtype")).dtype


def dtype_name(dtype: Any) -> str:
    """``float32``, ``bfloat16``, ... for a dtype of any namespace."""
    return str(dtype).rsplit(".", 1)[-1].removeprefix("dtype('").removesuffix("')")


@dataclass(frozen=True)
class Requirement:
    """A condition a kernel needs beyond its dtypes, stated for people and checked for calls.

    ``what`` is the condition in words (it appears in the op x backend support table);
    ``check(call)`` returns why a call does not meet it, or ``None``.
    """

    what: str
    check: Callable[[Call], str | None]


def requirement(what: str) -> Callable[[Callable[[Call], str | None]], Requirement]:
    """Decorator form of :class:`Requirement`: ``@requirement("d <= 256") def _(call): ...``."""

    def wrap(check: Callable[[Call], str | None]) -> Requirement:
        return Requirement(what, check)

    return wrap


#: Agreement of a kernel with the reference in the kernel-conformance test, relative to the
#: largest magnitude of the reference result, by dtype. float16/bfloat16 use FlashAttention's
#: criterion instead (see tests/test_kernels.py).
DEFAULT_RTOL: Mapping[str, float] = {"float64": 1e-10, "float32": 2e-5}


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op, and the calls it can run.

    Parameters
    ----------
    fwd, bwd
        The forward and backward functions in the op's kernel convention (module docstring).
    dtypes
        Names of the dtypes it computes in (the dtype of the op's first array argument);
        ``None`` for any floating dtype (the reference).
    requires
        Further conditions (:class:`Requirement`), e.g. a largest head width.
    deterministic
        Whether the same inputs give bitwise the same outputs and gradients.
    rtol
        Tolerance against the reference per dtype, for the kernel-conformance test.
    uses
        The ops its functions call through the dispatcher (they receive them as ``ops=``). A
        reference that uses other ops makes its op *composite*: under a backend with no kernel of
        its own for the op, the reference runs there and its inner ops dispatch to that backend.
    """

    fwd: Callable[..., Any]  # the op's kernel convention (see the module docstring)
    bwd: Callable[..., Any]
    dtypes: tuple[str, ...] | None = ("float32", "float64")
    requires: tuple[Requirement, ...] = ()
    deterministic: bool = True
    rtol: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RTOL))
    uses: tuple[str, ...] = ()

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Every reason this kernel cannot run ``call`` (empty when it can)."""
        reasons = []
        if self.dtypes is not None:
            name = dtype_name(call.dtype)
            if name not in self.dtypes:
                reasons.append(f"takes {' or '.join(self.dtypes)} inputs, got {name}")
        for req in self.requires:
            reason = req.check(call)
            if reason is not None:
                reasons.append(reason)
        return reasons


class Skeleton(NamedTuple):
    """Everything of a :class:`Residuals` record but its arrays (hashable)."""

    op: str
    backend: str
    options: Options
    nested: tuple[tuple[str, Skeleton], ...]
    outputs: tuple[tuple[str, tuple[int, ...], Any], ...]

    def backends(self) -> tuple[str, ...]:
        """The backends of this record and of its nested records, depth first.

        Returns
        -------
        tuple of str
            This record's backend first, then each nested record's, recursively.
        """
        return (self.backend,) + tuple(b for _, s in self.nested for b in s.backends())

    def with_backends(self, names: Sequence[str]) -> Skeleton:
        """The same skeleton with the backends of :meth:`backends` replaced, in that order.

        Parameters
        ----------
        names : sequence of str
            One backend name per record, in the order of :meth:`backends`.

        Returns
        -------
        Skeleton
        """
        it = iter(names)

        def walk(s: Skeleton) -> Skeleton:  # numpydoc ignore=GL08
            backend = next(it)
            return s._replace(backend=backend, nested=tuple((k, walk(n)) for k, n in s.nested))

        return walk(self)


@dataclass(frozen=True, eq=False)
class Residuals:
    """What backward needs: a flat record of arrays plus the op's options.

    ``arrays`` is flat: a nested record (an op run inside another, e.g. the attention core of
    multi-head attention) contributes its arrays under ``"key/name"``. A framework adapter saves
    ``arrays`` as its own tensors and rebuilds the record from :attr:`skeleton` with
    :meth:`from_skeleton`.
    """

    op: str
    backend: str
    arrays: Mapping[str, Array | None]
    options: Options
    nested: tuple[tuple[str, Skeleton], ...] = ()
    outputs: tuple[tuple[str, tuple[int, ...], Any], ...] = ()

    @property
    def skeleton(self) -> Skeleton:  # numpydoc ignore=RT01
        """The hashable, array-free part of the record (what an adapter keeps as a constant)."""
        return Skeleton(self.op, self.backend, self.options, self.nested, self.outputs)

    @property
    def static(self) -> Skeleton:  # numpydoc ignore=RT01
        """Alias of :attr:`skeleton`."""
        return self.skeleton

    @classmethod
    def from_skeleton(cls, skeleton: Skeleton, arrays: Mapping[str, Array | None]) -> Residuals:
        """The record made of a :attr:`skeleton` and the (flat) arrays it was saved with.

        Parameters
        ----------
        skeleton : Skeleton
            The array-free part, e.g. kept by a framework adapter.
        arrays : mapping of str to array or None
            The flat arrays, keyed as :attr:`arrays` (nested records under ``"key/name"``).

        Returns
        -------
        Residuals
        """
        return cls(
            skeleton.op,
            skeleton.backend,
            dict(arrays),
            skeleton.options,
            skeleton.nested,
            skeleton.outputs,
        )

    def with_arrays(self, arrays: Mapping[str, Array | None]) -> Residuals:
        """The same record holding other arrays (e.g. the adapter's tensors viewed as arrays).

        Parameters
        ----------
        arrays : mapping of str to array or None
            The same keys as :attr:`arrays`.

        Returns
        -------
        Residuals
        """
        if set(arrays) != set(self.arrays):
            raise ValueError(
                f"arrays: expected the keys {sorted(self.arrays)}, got {sorted(arrays)}"
            )
        return replace(self, arrays=dict(arrays))

    def inner(self, key: str) -> Residuals:
        """The nested record saved under ``key``.

        Parameters
        ----------
        key : str
            The name the composite kernel saved the inner op's record under.

        Returns
        -------
        Residuals
        """
        skeleton = dict(self.nested)[key]
        prefix = key + _NEST
        inner = {k[len(prefix) :]: a for k, a in self.arrays.items() if k.startswith(prefix)}
        return Residuals.from_skeleton(skeleton, inner)


_NEST = "/"

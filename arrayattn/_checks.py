"""Input validation shared by every public op.

Every message names the argument, says what was expected and what was given. Shapes and options
raise ``ValueError``; dtypes, non-arrays and mixed namespaces or devices raise ``TypeError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat

from ._xp import Array, device_of, namespace_name

__all__ = [
    "check_bool",
    "check_broadcastable",
    "check_choice",
    "check_floating",
    "check_int",
    "check_ndim",
    "check_params",
    "check_qkv",
    "check_real",
    "check_same_dtype",
    "image_block_namespace",
    "namespace",
    "param_arrays",
]


def namespace(**arrays: Array | None) -> Any:
    """The one array namespace of the given (non-``None``) arrays.

    Raises ``TypeError`` for a non-array, for arrays of different namespaces and for arrays on
    different devices: arrayattn never copies between them silently.
    """
    given = {name: a for name, a in arrays.items() if a is not None}
    for name, a in given.items():
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    spaces: dict[str, str] = {}
    for name, a in given.items():
        spaces.setdefault(namespace_name(array_api_compat.array_namespace(a)), name)
    if len(spaces) > 1:
        listing = ", ".join(f"{arg} is a {ns} array" for ns, arg in spaces.items())
        raise TypeError(
            f"arrays from different namespaces: {listing}; convert them to one namespace first"
        )
    xp = array_api_compat.array_namespace(*given.values())
    devices: dict[str, str] = {}
    for name, a in given.items():
        devices.setdefault(str(device_of(a)), name)
    if len(devices) > 1:
        listing = ", ".join(f"{arg} on {dev}" for dev, arg in devices.items())
        raise TypeError(f"arrays on different devices: {listing}; move them to one device first")
    return xp


def param_arrays(params: Any, name: str = "params") -> dict[str, Array]:
    """The arrays of a parameter mapping, each labelled ``params['key']`` for error messages.

    Raises ``TypeError`` when ``params`` is not a mapping; ``None`` entries are dropped.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{name}: expected a mapping of parameter arrays, got {type(params).__name__}"
        )
    return {f"{name}[{k!r}]": a for k, a in params.items() if a is not None}


def image_block_namespace(x: Array, params: Any) -> Any:
    """Namespace of a block op on images: ``x`` (N, C, H, W) floating, params of x's dtype."""
    arrays = param_arrays(params)
    xp = namespace(x=x, **arrays)
    check_floating(xp, "x", x)
    check_ndim("x", x, 4, "(N, C, H, W)", exact=True)
    check_same_dtype(x=x, **arrays)
    return xp


def check_floating(xp: Any, name: str, x: Array) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name}: expected a real floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def check_same_dtype(**arrays: Array | None) -> None:
    given = [(name, a) for name, a in arrays.items() if a is not None]
    first_name, first = given[0]
    for name, a in given[1:]:
        if a.dtype != first.dtype:
            raise TypeError(
                f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {a.dtype}"
            )


def check_qkv(
    xp: Any, q: Array, k: Array, v: Array, *, key_length: str = "Lk", same_batch: bool = True
) -> None:
    """Queries (..., Lq, d), keys (..., Lk, d) and values (..., Lk, dv) of one sequence attention.

    Floating dtypes, one dtype, equal ranks, matching d and Lk; with ``same_batch`` also equal
    leading dimensions (grouped-query attention checks its heads axis itself).
    """
    legend = {"q": "(..., Lq, d)", "k": f"(..., {key_length}, d)", "v": f"(..., {key_length}, dv)"}
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_floating(xp, name, x)
        check_ndim(name, x, 2, legend[name])
    check_same_dtype(q=q, k=k, v=v)
    if k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            f"k, v: expected {q.ndim} dimensions like q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected last dimension d = {q.shape[-1]} (from q), got shape {tuple(k.shape)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v: expected {key_length} = {k.shape[-2]} rows (from k), got shape {tuple(v.shape)}"
        )
    if same_batch:
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape[:-2]) != tuple(q.shape[:-2]):
                raise ValueError(
                    f"{name}: expected leading dimensions {tuple(q.shape[:-2])} (from q), "
                    f"got shape {tuple(x.shape)}"
                )


def check_bool(xp: Any, name: str, x: Array) -> None:
    if not xp.isdtype(x.dtype, "bool"):
        raise TypeError(
            f"{name}: expected a boolean array (True = may attend), got dtype {x.dtype}"
        )


def check_ndim(name: str, x: Array, ndim: int, legend: str, *, exact: bool = False) -> None:
    ok = x.ndim == ndim if exact else x.ndim >= ndim
    if not ok:
        need = f"exactly {ndim}" if exact else f"at least {ndim}"
        raise ValueError(
            f"{name}: expected shape {legend} ({need} dimensions), got shape {tuple(x.shape)}"
        )


def check_broadcastable(
    name: str, shape: Sequence[int], target: Sequence[int], legend: str
) -> None:
    """``shape`` must broadcast to ``target`` without changing ``target``."""
    shape, target = tuple(shape), tuple(target)
    # zip stops at the shorter shape: broadcasting aligns from the right.
    ok = len(shape) <= len(target) and all(
        s == t or s == 1 for s, t in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {legend} = {target}, got {shape}"
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        ok = False
    else:
        try:
            ok = value in choices
        except TypeError:  # unhashable or incomparable values
            ok = False
    if not ok:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    return value


def check_params(
    params: Any,
    required: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]] = {},
    *,
    name: str = "params",
) -> dict[str, Array]:
    """Check a parameter mapping: required keys present, no unknown keys, every shape as expected.

    ``required`` and ``optional`` map each key to its expected shape. Returns a plain ``dict`` of
    the given entries (``None`` values are dropped).
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{name}: expected a mapping of parameter arrays, got {type(params).__name__}"
        )
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"{name}: unknown keys {unknown}; expected {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
        )
    missing = sorted(k for k in required if params.get(k) is None)
    if missing:
        raise ValueError(f"{name}: missing required keys {missing}")
    out = {}
    for key, shape in {**required, **optional}.items():
        value = params.get(key)
        if value is None:
            continue
        if not array_api_compat.is_array_api_obj(value):
            raise TypeError(f"{name}[{key!r}]: expected an array, got {type(value).__name__}")
        got = tuple(getattr(value, "shape", ()))
        if got != tuple(shape):
            raise ValueError(f"{name}[{key!r}]: expected shape {tuple(shape)}, got {got}")
        out[key] = value
    return out

"""Helpers shared by the test modules: namespaces, conversions, tolerances, backend kernels."""

from __future__ import annotations

import importlib

import array_api_compat
import numpy as np
import pytest

import arrayattn as aa

NAMESPACES = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def load_namespace(name: str):
    """The array-API namespace called ``name``, or skip the test when it is not usable here."""
    if name == "numpy":
        return array_api_compat.array_namespace(np.empty(0))
    if name == "cupy":
        cupy = pytest.importorskip("cupy")
        if not cupy.cuda.is_available():
            pytest.skip("cupy: no CUDA device")
        return array_api_compat.array_namespace(cupy.empty(0))
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        import jax

        jax.config.update("jax_enable_x64", True)
        return array_api_compat.array_namespace(jnp.empty(0))
    if name == "torch":
        torch = pytest.importorskip("torch")
        return array_api_compat.array_namespace(torch.empty(0))
    return importlib.import_module(pytest.importorskip(name).__name__)


def to_xp(xp, a):
    """A NumPy array (or None, or a dict of them) as an array of ``xp``."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: to_xp(xp, v) for k, v in a.items()}
    return xp.asarray(np.asarray(a))


def to_numpy(x):
    """Any array (or tuple/dict/None of them) as NumPy."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(to_numpy(e) for e in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (np.ndarray, np.generic)):  # (also where NumPy stands in for CuPy)
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        return np.asarray(x.__array__() if hasattr(x, "__array__") else x._array)
    return np.asarray(x)


def has_kernel(op, backend: str) -> bool:
    """Whether ``backend`` is available here and implements ``op``."""
    for info in aa.backends():
        if info.name == backend:
            return info.available and info.ops is not None and op.name in info.ops
    raise ValueError(backend)


def require_kernel(op, backend: str) -> None:
    if not has_kernel(op, backend):
        pytest.skip(f"backend {backend} has no kernel for {op.name} here")


# : Forward/backward agreement of a backend with the float64 oracle, by dtype (relative to max
# |ref|).
RTOL = {np.float64: 1e-10, np.float32: 2e-5}


# -- dense float64 oracles for scaled dot-product attention (docs/derivations/attention.rst) -----


def causal_keep(lq: int, lk: int, causal) -> np.ndarray | None:
    """The (Lq, Lk) keep-mask of a causal option: top-left keeps j <= i, bottom-right j <=
    i+Lk-Lq."""
    if causal in (False, None):
        return None
    offset = 0 if causal in (True, "top_left") else lk - lq
    return np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset


def sdpa_probs(
    q, k, v, *, mask=None, bias=None, causal=False, scale=None, enable_gqa=False, dtype=np.float64
):
    """Materialised probabilities of the dense oracle: (p, v expanded, k expanded, lse, scale).

    Everything is computed in ``dtype`` (float64 for the oracle; the inputs' own dtype for the
    "naive same dtype" baseline of the low-precision criterion). Fully masked rows: p = 0, lse =
    +inf.
    """
    q, k, v = (np.asarray(a).astype(dtype) for a in (q, k, v))
    if enable_gqa:
        groups = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0
    s = (q @ np.swapaxes(k, -1, -2)) * dtype(scale)
    if bias is not None:
        s = s + np.asarray(bias).astype(dtype)
    keep = np.ones(s.shape, dtype=bool)
    if mask is not None:
        keep = keep & np.asarray(mask)
    band = causal_keep(lq, lk, causal)
    if band is not None:
        keep = keep & band
    s = np.where(keep, s, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
        empty = m == -np.inf
        e = np.exp(s - np.where(empty, 0, m))
        ell = np.sum(e, axis=-1, keepdims=True)
        p = e / np.where(empty, 1, ell)
        lse = np.where(empty, np.inf, m + np.log(np.where(empty, 1, ell)))[..., 0]
    return p, k, v, lse, scale


def sdpa_oracle(q, k, v, *, dtype=np.float64, **options):
    """Dense forward: (out, lse) of softmax(scale q kᵀ + bias, masked) v; empty rows give 0,
    +inf."""
    p, _, v, lse, _ = sdpa_probs(q, k, v, dtype=dtype, **options)
    return p @ v, lse


def sdpa_oracle_grads(
    q, k, v, dout, dlse=None, *, dtype=np.float64, bias=None, enable_gqa=False, **options
):
    """Dense backward (derivation: docs/derivations/attention.rst) from the materialised
    probabilities: (dq, dk, dv, dbias)."""
    q_, k_ = np.asarray(q).astype(dtype), np.asarray(k).astype(dtype)
    p, ke, ve, _, scale = sdpa_probs(
        q, k, v, bias=bias, enable_gqa=enable_gqa, dtype=dtype, **options
    )
    do = np.asarray(dout).astype(dtype)
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(ve, -1, -2)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    if dlse is not None:
        ds = ds + p * np.asarray(dlse).astype(dtype)[..., None]
    dq = dtype(scale) * ds @ ke
    dk = dtype(scale) * np.swapaxes(ds, -1, -2) @ q_
    if enable_gqa:
        groups = q_.shape[-3] // k_.shape[-3]
        shape = dk.shape[:-3] + (k_.shape[-3], groups) + dk.shape[-2:]
        dk = dk.reshape(shape).sum(axis=-3)
        dv = dv.reshape(shape[:-1] + (dv.shape[-1],)).sum(axis=-3)
    dbias = None
    if bias is not None:
        dbias = sum_to(ds, np.shape(bias))
    return dq, dk, dv, dbias


def sum_to(x: np.ndarray, shape) -> np.ndarray:
    """Sum ``x`` down to ``shape`` (the adjoint of broadcasting an array of ``shape`` to
    x.shape)."""
    shape = tuple(shape)
    x = x.sum(axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def assert_close_rel(actual, expected, rtol: float, what: str = "", floor: float = 0.0) -> None:
    """max|actual - expected| <= rtol * max(max|expected|, floor); NaN/inf at the same places.

    ``floor`` is the scale of the problem for results that can be exactly zero in exact arithmetic
    (e.g. the gradient of a bias broadcast along the keys: softmax is shift invariant).
    """
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    same_nonfinite = ~np.isfinite(expected)
    np.testing.assert_array_equal(actual[same_nonfinite], expected[same_nonfinite], err_msg=what)
    fin = np.isfinite(expected)
    if not fin.any():
        return
    err = np.max(np.abs(actual[fin] - expected[fin]))
    ref = max(np.max(np.abs(expected[fin])), floor, 1e-300)
    assert err <= rtol * ref, f"{what}: max abs err {err:.3e} > {rtol:.1e} * max|ref| {ref:.3e}"


def directional_check(
    op,
    args,
    kwargs,
    rng,
    *,
    directions: int = 3,
    tol: float = 1e-6,
    floor: float = 1.0,
    eps: float = 1e-6,
) -> dict[str, float]:
    """The dot-product test ``<J^T ct, u> = <ct, J u>`` (J u by central differences) per leaf.

    Like :func:`arrayattn._gradcheck.directional_errors`, but the error is relative to
    ``max(|fd|, |analytic|, floor)`` so that a gradient that is exactly zero in exact arithmetic
    (a bias broadcast along the keys) is not judged on rounding noise. Asserts, returns the errors.
    """
    from arrayattn import _gradcheck as gc

    out, res = op.fwd(*args, **kwargs)
    bound = gc._bind(op, args, kwargs).arguments
    worst: dict[str, float] = {}
    for _ in range(directions):
        cts = gc.random_cotangents(out, rng)
        grads = op.bwd(res, cts)
        for leaf in gc.differentiable_leaves(op, args, kwargs):
            x = np.asarray(gc._get(bound, leaf))
            u = rng.standard_normal(x.shape)
            values = []
            for sign in (1.0, -1.0):
                a, kw = gc._replaced(op, args, kwargs, leaf, x + sign * eps * u)
                values.append(gc._pairing(op(*a, **kw), cts))
            fd = (values[0] - values[1]) / (2 * eps)
            analytic = float(np.sum(np.asarray(gc._grad_of(grads, leaf), dtype=np.float64) * u))
            name = leaf[0] if leaf[1] is None else f"{leaf[0]}[{leaf[1]}]"
            err = abs(fd - analytic) / max(abs(fd), abs(analytic), floor)
            worst[name] = max(worst.get(name, 0.0), err)
    assert max(worst.values(), default=0.0) < tol, worst
    return worst

"""A vectorizable base-2 exponential for Numba kernels (no SVML needed).

``np.exp`` inside ``@njit`` is a scalar libm call when llvmlite lacks Intel SVML, which makes the
exponential the bottleneck of attention. ``exp2(x)`` here is branch-free straight-line code that
LLVM's loop vectorizer turns into SIMD:

* range reduction ``k = floor(x + 1/2)``, ``r = x - k`` in [-1/2, 1/2] (exact in binary floating
  point, so no Cody–Waite split of ln 2 is needed in base 2);
* ``2**r`` by a polynomial: a relative-error least-squares fit of degree 6 for float32 (< 1 ulp
  measured), the Taylor series of degree 13 for float64 (< 2e-16 relative);
* ``2**k`` built from its exponent bits ``(k + bias) << mantissa_bits`` and reinterpreted as a float.

``x`` is clamped to [-127, 128] (float32) / [-1023, 1024] (float64): at the lower bound the exponent
bits are 0, so ``exp2(-inf)`` and every underflowing argument give exactly +0.0 (masked entries stay
exactly 0); above it the result is +inf. NaN propagates (the clamps keep NaN, the polynomial turns it
into NaN).

The kernels that use these helpers are cached by Numba (``cache=True``), and Numba invalidates a
cache entry only when the file of the cached function changes: after editing this file alone, clear
``backends/numba/__pycache__`` (or touch ``attention.py``).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["exp2", "exp2_array", "row_max"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@intrinsic
def _i32_as_f32(typingctx, x):
    if x != types.int32:
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _i64_as_f64(typingctx, x):
    if x != types.int64:
        return None
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _f32_as_i32(typingctx, x):
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f64_as_i64(typingctx, x):
    if x != types.float64:
        return None
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


# float32: relative least-squares fit of 2**r on [-1/2, 1/2] (Chebyshev nodes), degree 6.
_F0 = np.float32(1.0)
_F1 = np.float32(6.93147206e-01)
_F2 = np.float32(2.40226466e-01)
_F3 = np.float32(5.55032900e-02)
_F4 = np.float32(9.61851953e-03)
_F5 = np.float32(1.33998604e-03)
_F6 = np.float32(1.53375768e-04)
_FLO = np.float32(-127.0)
_FHI = np.float32(128.0)
_FHALF = np.float32(0.5)

# float64: Taylor coefficients ln(2)**n / n!, n = 0..13.
_D = tuple(LN2**n / math.factorial(n) for n in range(14))
(_D0, _D1, _D2, _D3, _D4, _D5, _D6, _D7, _D8, _D9, _D10, _D11, _D12, _D13) = _D


@njit(inline="always", cache=True)
def _exp2_f32(x):
    x = _FLO if x < _FLO else x
    x = _FHI if x > _FHI else x
    kf = np.floor(x + _FHALF)
    r = x - kf
    p = _F6 * r + _F5
    p = p * r + _F4
    p = p * r + _F3
    p = p * r + _F2
    p = p * r + _F1
    p = p * r + _F0
    bits = np.int32((np.int64(kf) + 127) << 23)
    return p * _i32_as_f32(bits)


@njit(inline="always", cache=True)
def _exp2_f64(x):
    x = -1023.0 if x < -1023.0 else x
    x = 1024.0 if x > 1024.0 else x
    kf = np.floor(x + 0.5)
    r = x - kf
    p = _D13 * r + _D12
    p = p * r + _D11
    p = p * r + _D10
    p = p * r + _D9
    p = p * r + _D8
    p = p * r + _D7
    p = p * r + _D6
    p = p * r + _D5
    p = p * r + _D4
    p = p * r + _D3
    p = p * r + _D2
    p = p * r + _D1
    p = p * r + _D0
    bits = np.int64((np.int64(kf) + 1023) << 52)
    return p * _i64_as_f64(bits)


def exp2(x):
    """``2**x`` of a float32 or float64 scalar, in its own precision (use inside ``@njit``)."""
    raise NotImplementedError("exp2 is only callable from Numba-compiled code")


@overload(exp2, inline="always")
def _exp2_overload(x):
    if x == types.float32:
        return lambda x: _exp2_f32(x)
    if x == types.float64:
        return lambda x: _exp2_f64(x)
    return None


@njit(cache=True)
def exp2_array(x):
    """``exp2`` over a 1-D float32/float64 array (for tests and benchmarks)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp2(x[i])
    return out


# -- row maximum ---------------------------------------------------------------------------------
# LLVM does not vectorize a float max reduction unless it may assume no NaN and no infinity, and
# masked logits are -inf. The maximum is taken instead over integer keys that order like the floats
# (flip the 31/63 magnitude bits of negative numbers): integer max reductions vectorize without
# fast-math. A NaN maps beyond +-inf, so a row with a NaN logit still gets a NaN output (through
# exp2 of the NaN itself).


@njit(cache=True)
def _row_max_f32(s, n, init):
    b = np.int64(_f32_as_i32(init))
    best = np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))
    for c in range(n):
        b = np.int64(_f32_as_i32(s[c]))
        key = np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))
        best = key if key > best else best
    b = np.int64(best)
    return _i32_as_f32(np.int32(b ^ ((b >> 31) & 0x7FFFFFFF)))


@njit(cache=True)
def _row_max_f64(s, n, init):
    mag = np.int64(0x7FFFFFFFFFFFFFFF)
    b = _f64_as_i64(init)
    best = b ^ ((b >> 63) & mag)
    for c in range(n):
        b = _f64_as_i64(s[c])
        key = b ^ ((b >> 63) & mag)
        best = key if key > best else best
    return _i64_as_f64(best ^ ((best >> 63) & mag))


def row_max(s, n, init):
    """``max(init, s[0], ..., s[n-1])`` of a float32/float64 row, vectorized (Numba only)."""
    raise NotImplementedError("row_max is only callable from Numba-compiled code")


@overload(row_max)
def _row_max_overload(s, n, init):
    if init == types.float32:
        return lambda s, n, init: _row_max_f32(s, n, init)
    if init == types.float64:
        return lambda s, n, init: _row_max_f64(s, n, init)
    return None

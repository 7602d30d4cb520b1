"""A vectorizable base-2 exponential for Numba kernels (no SVML needed).

``np.exp`` inside ``@njit`` is a scalar libm call when llvmlite lacks Intel SVML, which makes the
exponential the bottleneck of attention. ``exp2(x)`` here is branch-free straight-line code that
LLVM's loop vectorizer turns into SIMD:

* range reduction ``k = floor(x + 1/2)``, ``r = x - k`` in [-1/2, 1/2] (exact in binary floating
  point, so no Cody–Waite split of ln 2 is needed in base 2);
* ``2**r`` by a polynomial: a relative-error least-squares fit of degree 6 for float32 (< 1 ulp
  measured), the Taylor series of degree 13 for float64 (< 2e-16 relative);
* ``2**k`` built from its exponent bits ``(k + bias) << mantissa_bits`` and reinterpreted as a
float.

``x`` is clamped to [-127, 128] (float32) / [-1023, 1024] (float64): at the lower bound the exponent
bits are 0, so ``exp2(-inf)`` and every underflowing argument give exactly +0.0 (masked entries stay
exactly 0); above it the result is +inf. NaN propagates (the clamps keep NaN, the polynomial turns
it
into NaN).

``tanh(x)`` is built on ``exp2``: ``1 - 2/(2**(2x·log2 e) + 1)`` (with the sign of x) for
|x| >= 0.55, where it loses no accuracy to cancellation, and an odd polynomial
``x + x·u·Q(u)``, ``u = x²``, below (a relative least-squares fit of degree 4 in u for float32, the
Taylor series to x**41 for float64); both branches are computed and one is selected, so the loop
still vectorizes. Large |x| gives exactly ±1, NaN propagates.

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

__all__ = ["exp2", "exp2_array", "row_max", "tanh", "tanh_array"]

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


# -- tanh ---------------------------------------------------------------------------------------


def _tanh_taylor(terms):
    """Taylor coefficients of tanh: ``T_n = 2^2n (2^2n - 1) B_2n / (2n)!`` of x**(2n-1)."""
    from fractions import Fraction

    a, bern = [Fraction(0)] * (2 * terms + 1), []
    for m in range(2 * terms + 1):  # Akiyama–Tanigawa: Bernoulli numbers B_0 .. B_2terms
        a[m] = Fraction(1, m + 1)
        for j in range(m, 0, -1):
            a[j - 1] = j * (a[j - 1] - a[j])
        bern.append(a[0])
    return tuple(
        float(Fraction(2 ** (2 * n) * (2 ** (2 * n) - 1)) * bern[2 * n] / math.factorial(2 * n))
        for n in range(1, terms + 1)
    )


_TANH_SMALL = 0.55
# float32: tanh(x) = x + x·u·Q(u), Q of degree 4 fitted on u in (0, 0.55²] (rel. error 1e-9).
_G0 = np.float32(-0.3333332)
_G1 = np.float32(0.13332632)
_G2 = np.float32(-0.053856663)
_G3 = np.float32(0.021088185)
_G4 = np.float32(-0.006296012)
_GSMALL = np.float32(_TANH_SMALL)
_G2LOG2E = np.float32(2.0 * LOG2E)
_GONE = np.float32(1.0)
_GTWO = np.float32(2.0)
# float64: the Taylor series x + T_2 x³ + ... + T_21 x**41 (truncation < 1e-17 relative at 0.55).
_T = _tanh_taylor(21)
(
    _T1,
    _T2,
    _T3,
    _T4,
    _T5,
    _T6,
    _T7,
    _T8,
    _T9,
    _T10,
    _T11,
    _T12,
    _T13,
    _T14,
    _T15,
    _T16,
    _T17,
    _T18,
    _T19,
    _T20,
    _T21,
) = _T


@njit(inline="always", cache=True, error_model="numpy")
def _tanh_f32(x):
    ax = abs(x)
    u = x * x
    q = _G4 * u + _G3
    q = q * u + _G2
    q = q * u + _G1
    q = q * u + _G0
    small = x + x * (u * q)
    big = _GONE - _GTWO / (_exp2_f32(_G2LOG2E * ax) + _GONE)
    big = big if x >= 0 else -big
    return small if ax < _GSMALL else big


@njit(inline="always", cache=True, error_model="numpy")
def _tanh_f64(x):
    ax = abs(x)
    u = x * x
    q = _T21 * u + _T20
    q = q * u + _T19
    q = q * u + _T18
    q = q * u + _T17
    q = q * u + _T16
    q = q * u + _T15
    q = q * u + _T14
    q = q * u + _T13
    q = q * u + _T12
    q = q * u + _T11
    q = q * u + _T10
    q = q * u + _T9
    q = q * u + _T8
    q = q * u + _T7
    q = q * u + _T6
    q = q * u + _T5
    q = q * u + _T4
    q = q * u + _T3
    q = q * u + _T2
    small = x + x * (u * q)
    big = 1.0 - 2.0 / (_exp2_f64((2.0 * LOG2E) * ax) + 1.0)
    big = big if x >= 0 else -big
    return small if ax < _TANH_SMALL else big


def tanh(x):
    """``tanh(x)`` of a float32 or float64 scalar, in its own precision (use inside ``@njit``)."""
    raise NotImplementedError("tanh is only callable from Numba-compiled code")


@overload(tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    if x == types.float64:
        return lambda x: _tanh_f64(x)
    return None


@njit(cache=True, error_model="numpy")
def tanh_array(x):
    """``tanh`` over a 1-D float32/float64 array (for tests and benchmarks). Callers should compile
    with ``error_model="numpy"``: Numba's default zero-division check keeps the loop scalar."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = tanh(x[i])
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

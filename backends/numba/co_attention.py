"""Numba kernel of CoDA (compositional de-attention, docs/derivations/co_attention.rst).

Two paths, chosen by the shapes alone (so a result never depends on the thread count):

* **Several items** (batch size ≥ 2, no empty axis): one fused pass per item, the items spread over
  threads. Each item does its products with single-threaded BLAS (``_blas.gemm``) and its
  elementwise work in vectorized loops: projections, ``E``, the L1 distances (reduced over the
  contiguous k axis, no (La, Lb, k) tensor), ``tanh``/``sigmoid``, ``A' = M B``, ``B' = Mᵀ A``;
  backward the same way, with ``dga_i = Σ_j ddist_ij sign(ga_i − gb_j)`` and ``dgb_j`` as row
  sums. The weight gradients (products over all items) are split by rows of the gradient, in a
  parallel region too. Keeping the whole op inside parallel regions matters more than the fusion:
  NumPy's threaded BLAS products
  alternating with ``prange`` loops made both thread pools spin against each other (forward +
  backward 42 ms against 26 ms single-threaded at N=8, L=128, d=300, k=150).
* **One item** (or an empty axis): the array-API reference on NumPy, with its ``l1=`` pair
  replaced by the fused L1 loops below (parallel over rows) and BLAS threaded as usual.

Extra memory is O(La·Lb) per item instead of O(La·Lb·k). Arithmetic runs in the input dtype
(float32 or float64; the means of the centred variant and the α/β gradient sums accumulate in
float64); other dtypes are left to ``array_api``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel
from arrayattn._reference.co_attention import coda_backward, coda_forward
from arrayattn._xp import flat_rows

from ._blas import HAS_BLAS, blas_threads, gemm, single_threaded_blas
from ._exp import LOG2E, exp2, tanh

__all__ = ["KERNELS"]

# Reassociation lets the k-axis reduction vectorize (the sum order then depends on the SIMD width,
# as NumPy's pairwise sum does).
_FAST = {"reassoc", "contract"}

#: Calls with less work than this (items·La·Lb·(d + k), about the multiply-adds of the pair
#: products and |difference| terms) run the serial twins: one core does several thousand per
#: microsecond, so such a call is done before a parallel region (tens of microseconds idle,
#: milliseconds on a busy machine) pays for itself.
PARALLEL_MIN_WORK = 1 << 22


@njit(inline="always", cache=True, fastmath=_FAST)
def _dist_row(ga, gb, dist, n, i):
    a, out = ga[n, i], dist[n, i]
    for j in range(gb.shape[1]):
        g = gb[n, j]
        s = a[0] - a[0]
        for t in range(a.shape[0]):
            s += abs(a[t] - g[t])
        out[j] = s


@njit(inline="always", cache=True, fastmath=_FAST)
def _signed(c, d, zero):
    """``c · sign(d)``, 0 at a tie (the L1 subgradient the reference's ``xp.sign`` takes);
    branch-free, so the loops around it vectorize."""
    return c * (d > zero) - c * (d < zero)


@njit(inline="always", cache=True, fastmath=_FAST)
def _signed_sum_row(x, y, w, acc):
    """``acc += Σ_r w[r] · sign(x − y[r])`` over the rows ``y[r]``."""
    zero = w[0] - w[0]
    for r in range(y.shape[0]):
        c = w[r]
        g = y[r]
        for t in range(x.shape[0]):
            acc[t] += _signed(c, x[t] - g[t], zero)


@njit(inline="always", cache=True, fastmath=_FAST)
def _signed_sums_pair(x, y, w, acc_x, acc_y):
    """Both sides of row ``x``'s terms at once: ``acc_x += Σ_r w[r] sign(x − y[r])`` and
    ``acc_y[r] −= w[r] sign(x − y[r])`` (one sign per term; ``acc_y`` must be this thread's)."""
    zero = w[0] - w[0]
    for r in range(y.shape[0]):
        c = w[r]
        g, out = y[r], acc_y[r]
        for t in range(x.shape[0]):
            s = _signed(c, x[t] - g[t], zero)
            acc_x[t] += s
            out[t] -= s


@njit(parallel=True, cache=True, fastmath=_FAST)
def _dist_par(ga, gb, dist):
    la = ga.shape[1]
    for r in prange(ga.shape[0] * la):
        _dist_row(ga, gb, dist, r // la, r % la)


@njit(cache=True, fastmath=_FAST)
def _dist_ser(ga, gb, dist):
    for n in range(ga.shape[0]):
        for i in range(ga.shape[1]):
            _dist_row(ga, gb, dist, n, i)


@njit(parallel=True, cache=True, fastmath=_FAST)
def _dist_bwd_par(ga, gb, ddist, ddist_t, dga, dgb):
    la, lb = ga.shape[1], gb.shape[1]
    for r in prange(ga.shape[0] * la):
        n, i = r // la, r % la
        _signed_sum_row(ga[n, i], gb[n], ddist[n, i], dga[n, i])
    for r in prange(gb.shape[0] * lb):
        n, j = r // lb, r % lb
        _signed_sum_row(gb[n, j], ga[n], ddist_t[n, j], dgb[n, j])


@njit(cache=True, fastmath=_FAST)
def _dist_bwd_ser(ga, gb, ddist, ddist_t, dga, dgb):
    for n in range(ga.shape[0]):
        for i in range(ga.shape[1]):
            _signed_sum_row(ga[n, i], gb[n], ddist[n, i], dga[n, i])
        for j in range(gb.shape[1]):
            _signed_sum_row(gb[n, j], ga[n], ddist_t[n, j], dgb[n, j])


# -- the fused per-item pass ----------------------------------------------------------------------


@njit(inline="always", cache=True)
def _project(x, n, w, bias, y):
    """``y[n] = x[n] wᵀ + bias`` for one item."""
    rows, d, k = x.shape[1], x.shape[2], w.shape[0]
    gemm(False, True, rows, k, d, 1.0, x, n * rows * d, d, w, 0, d, 0.0, y, n * rows * k, k)
    for r in range(rows):
        yr = y[n, r]
        for c in range(k):
            yr[c] += bias[c]


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _fwd_item(
    a,
    b,
    w_e,
    b_e,
    w_n,
    b_n,
    alpha,
    beta,
    centering,
    log2e,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    oa,
    ob,
    n,
):
    la, lb, d, k = a.shape[1], b.shape[1], a.shape[2], w_e.shape[0]
    one = alpha - alpha + 1
    _project(a, n, w_e, b_e, fa)
    _project(b, n, w_e, b_e, fb)
    _project(a, n, w_n, b_n, ga)
    _project(b, n, w_n, b_n, gb)
    gemm(
        False, True, la, lb, k, 1.0, fa, n * la * k, k, fb, n * lb * k, k, 0.0, sim, n * la * lb, lb
    )
    for i in range(la):
        _dist_row(ga, gb, dist, n, i)
    shift = 0.0  # N − mean(N) = −β·dist + β·mean(dist)
    if centering:
        for i in range(la):
            for j in range(lb):
                shift += dist[n, i, j]
        shift *= beta / (la * lb)
    shift = alpha - alpha + shift  # in the compute dtype
    m = np.empty((la, lb), dtype=a.dtype)
    for i in range(la):
        for j in range(lb):
            x = shift - beta * dist[n, i, j]
            e = exp2(-abs(x) * log2e)
            s = (one if x >= 0 else e) / (one + e)  # σ(x) without overflow
            th = tanh(alpha * sim[n, i, j])
            t[n, i, j] = th
            sg[n, i, j] = s
            m[i, j] = th * s
    gemm(False, False, la, d, lb, 1.0, m, 0, lb, b, n * lb * d, d, 0.0, oa, n * la * d, d)
    gemm(True, False, lb, d, la, 1.0, m, 0, lb, a, n * la * d, d, 0.0, ob, n * lb * d, d)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FAST)
def _fwd_par(
    a,
    b,
    w_e,
    b_e,
    w_n,
    b_n,
    alpha,
    beta,
    centering,
    log2e,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    oa,
    ob,
):
    for n in prange(a.shape[0]):
        _fwd_item(
            a,
            b,
            w_e,
            b_e,
            w_n,
            b_n,
            alpha,
            beta,
            centering,
            log2e,
            fa,
            fb,
            ga,
            gb,
            sim,
            dist,
            t,
            sg,
            oa,
            ob,
            n,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _fwd_ser(
    a,
    b,
    w_e,
    b_e,
    w_n,
    b_n,
    alpha,
    beta,
    centering,
    log2e,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    oa,
    ob,
):
    for n in range(a.shape[0]):
        _fwd_item(
            a,
            b,
            w_e,
            b_e,
            w_n,
            b_n,
            alpha,
            beta,
            centering,
            log2e,
            fa,
            fb,
            ga,
            gb,
            sim,
            dist,
            t,
            sg,
            oa,
            ob,
            n,
        )


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _bwd_item(
    a,
    b,
    doa,
    dob,
    w_e,
    w_n,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    alpha,
    beta,
    centering,
    da,
    db,
    dfa,
    dfb,
    dga,
    dgb,
    dalpha,
    dbeta,
    n,
):
    la, lb, d = a.shape[1], b.shape[1], a.shape[2]
    k, kn = w_e.shape[0], w_n.shape[0]
    one = alpha - alpha + 1
    dm = np.empty((la, lb), dtype=a.dtype)  # dM, then dN, then d dist
    m = np.empty((la, lb), dtype=a.dtype)  # M, then dE, then d sim
    gemm(False, True, la, lb, d, 1.0, doa, n * la * d, d, b, n * lb * d, d, 0.0, dm, 0, lb)
    gemm(False, True, la, lb, d, 1.0, a, n * la * d, d, dob, n * lb * d, d, 1.0, dm, 0, lb)
    for i in range(la):
        for j in range(lb):
            m[i, j] = t[n, i, j] * sg[n, i, j]
    gemm(False, False, la, d, lb, 1.0, m, 0, lb, dob, n * lb * d, d, 0.0, da, n * la * d, d)
    gemm(True, False, lb, d, la, 1.0, m, 0, lb, doa, n * la * d, d, 0.0, db, n * lb * d, d)
    mean = 0.0
    for i in range(la):
        for j in range(lb):
            g, th, s = dm[i, j], t[n, i, j], sg[n, i, j]
            m[i, j] = g * s * (one - th * th)
            dn = g * th * s * (one - s)
            dm[i, j] = dn
            mean += dn
    mean = alpha - alpha + (mean / (la * lb) if centering else 0.0)
    acc_alpha, acc_beta = 0.0, 0.0
    for i in range(la):
        for j in range(lb):
            de, dn = m[i, j], dm[i, j] - mean
            acc_alpha += de * sim[n, i, j]
            acc_beta -= dn * dist[n, i, j]
            m[i, j] = alpha * de
            dm[i, j] = -beta * dn
    dalpha[n], dbeta[n] = acc_alpha, acc_beta
    gemm(False, False, la, k, lb, 1.0, m, 0, lb, fb, n * lb * k, k, 0.0, dfa, n * la * k, k)
    gemm(True, False, lb, k, la, 1.0, m, 0, lb, fa, n * la * k, k, 0.0, dfb, n * lb * k, k)
    for i in range(la):
        _signed_sums_pair(ga[n, i], gb[n], dm[i], dga[n, i], dgb[n])
    gemm(False, False, la, d, k, 1.0, dfa, n * la * k, k, w_e, 0, d, 1.0, da, n * la * d, d)
    gemm(False, False, la, d, kn, 1.0, dga, n * la * kn, kn, w_n, 0, d, 1.0, da, n * la * d, d)
    gemm(False, False, lb, d, k, 1.0, dfb, n * lb * k, k, w_e, 0, d, 1.0, db, n * lb * d, d)
    gemm(False, False, lb, d, kn, 1.0, dgb, n * lb * kn, kn, w_n, 0, d, 1.0, db, n * lb * d, d)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FAST)
def _bwd_par(
    a,
    b,
    doa,
    dob,
    w_e,
    w_n,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    alpha,
    beta,
    centering,
    da,
    db,
    dfa,
    dfb,
    dga,
    dgb,
    dalpha,
    dbeta,
):
    for n in prange(a.shape[0]):
        _bwd_item(
            a,
            b,
            doa,
            dob,
            w_e,
            w_n,
            fa,
            fb,
            ga,
            gb,
            sim,
            dist,
            t,
            sg,
            alpha,
            beta,
            centering,
            da,
            db,
            dfa,
            dfb,
            dga,
            dgb,
            dalpha,
            dbeta,
            n,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _bwd_ser(
    a,
    b,
    doa,
    dob,
    w_e,
    w_n,
    fa,
    fb,
    ga,
    gb,
    sim,
    dist,
    t,
    sg,
    alpha,
    beta,
    centering,
    da,
    db,
    dfa,
    dfb,
    dga,
    dgb,
    dalpha,
    dbeta,
):
    for n in range(a.shape[0]):
        _bwd_item(
            a,
            b,
            doa,
            dob,
            w_e,
            w_n,
            fa,
            fb,
            ga,
            gb,
            sim,
            dist,
            t,
            sg,
            alpha,
            beta,
            centering,
            da,
            db,
            dfa,
            dfb,
            dga,
            dgb,
            dalpha,
            dbeta,
            n,
        )


#: Rows of a weight gradient per work item of ``_weight_grads`` (fixed, so the partition and
#: hence the result depend on the shapes only).
WEIGHT_ROWS = 16


@njit(inline="always", cache=True)
def _weight_rows(dxa, xa, dxb, xb, dw, c):
    """Rows ``[c·WEIGHT_ROWS, …)`` of ``dw = dxaᵀ xa + dxbᵀ xb`` (flat (M, k) and (M, d)
    factors)."""
    k, d = dw.shape
    r0 = c * WEIGHT_ROWS
    rows = min(WEIGHT_ROWS, k - r0)
    gemm(True, False, rows, d, dxa.shape[0], 1.0, dxa, r0, k, xa, 0, d, 0.0, dw, r0 * d, d)
    gemm(True, False, rows, d, dxb.shape[0], 1.0, dxb, r0, k, xb, 0, d, 1.0, dw, r0 * d, d)


@njit(parallel=True, cache=True)
def _weight_grad_par(dxa, xa, dxb, xb, dw):
    for c in prange((dw.shape[0] + WEIGHT_ROWS - 1) // WEIGHT_ROWS):
        _weight_rows(dxa, xa, dxb, xb, dw, c)


@njit(cache=True)
def _weight_grad_ser(dxa, xa, dxb, xb, dw):
    for c in range((dw.shape[0] + WEIGHT_ROWS - 1) // WEIGHT_ROWS):
        _weight_rows(dxa, xa, dxb, xb, dw, c)


# -- Python side ----------------------------------------------------------------------------------


def _items(x):
    """``x`` (..., L, k) as a C-contiguous (items, L, k) array."""
    return np.ascontiguousarray(x.reshape((math.prod(x.shape[:-2]),) + x.shape[-2:]))


def _parallel(a, b, k) -> bool:
    """items·La·Lb·(d + k) >= PARALLEL_MIN_WORK."""
    return math.prod(a.shape[:-1]) * b.shape[-2] * (a.shape[-1] + k) >= PARALLEL_MIN_WORK


def _fused(a, b, params) -> bool:
    """Whether a call takes the per-item path (a function of the shapes only)."""
    shapes = (a.shape, b.shape, params["w_e"].shape, params["w_n"].shape)
    return HAS_BLAS and math.prod(a.shape[:-2]) >= 2 and 0 not in sum(shapes, ())


def _l1_distances(xp, ga, gb):
    g_a, g_b = _items(ga), _items(gb)
    dist = np.empty(g_a.shape[:2] + (g_b.shape[1],), dtype=g_a.dtype)
    if dist.size:
        (_dist_par if g_a.size * g_b.shape[1] >= PARALLEL_MIN_WORK else _dist_ser)(g_a, g_b, dist)
    return dist.reshape(ga.shape[:-1] + (gb.shape[-2],))


def _l1_distances_backward(xp, ga, gb, ddist):
    # dgb_j = −Σ_i ddist_ij sign(ga_i − gb_j) = Σ_i ddist_ij sign(gb_j − ga_i): the same row sum
    # with the roles swapped, over the transposed cotangent (made contiguous so rows are rows).
    g_a, g_b = _items(ga), _items(gb)
    dd = _items(np.asarray(ddist, dtype=g_a.dtype))
    dd_t = np.ascontiguousarray(dd.transpose(0, 2, 1))
    dga, dgb = np.zeros_like(g_a), np.zeros_like(g_b)
    if dd.size and g_a.shape[2]:
        parallel = g_a.size * g_b.shape[1] >= PARALLEL_MIN_WORK
        (_dist_bwd_par if parallel else _dist_bwd_ser)(g_a, g_b, dd, dd_t, dga, dgb)
    return dga.reshape(ga.shape), dgb.reshape(gb.shape)


_L1 = (_l1_distances, _l1_distances_backward)


def _scalar(p, key, dtype):
    return dtype.type(p[key][0]) if key in p else dtype.type(1)


def _fused_fwd(a, b, p, centering, save):
    dtype = a.dtype
    a3, b3 = _items(a), _items(b)
    nb, la, lb = a3.shape[0], a3.shape[1], b3.shape[1]
    k, kn = p["w_e"].shape[0], p["w_n"].shape[0]
    c = np.ascontiguousarray
    # every element of these is written by the kernel (the projections with beta = 0)
    fa, fb = np.empty((nb, la, k), dtype), np.empty((nb, lb, k), dtype)
    ga, gb = np.empty((nb, la, kn), dtype), np.empty((nb, lb, kn), dtype)
    sim, dist, t, sg = (np.empty((nb, la, lb), dtype) for _ in range(4))
    oa, ob = np.empty_like(a3), np.empty_like(b3)
    kernel = _fwd_par if _parallel(a, b, k) else _fwd_ser
    with single_threaded_blas():
        kernel(
            a3,
            b3,
            c(p["w_e"]),
            c(p.get("b_e", np.zeros(k, dtype))),
            c(p["w_n"]),
            c(p.get("b_n", np.zeros(kn, dtype))),
            _scalar(p, "alpha", dtype),
            _scalar(p, "beta", dtype),
            centering,
            dtype.type(LOG2E),
            fa,
            fb,
            ga,
            gb,
            sim,
            dist,
            t,
            sg,
            oa,
            ob,
        )
    outs = (oa.reshape(a.shape), ob.reshape(b.shape))
    if not save:
        return outs, {}
    return outs, {
        "a": a,
        "b": b,
        "fa": fa,
        "fb": fb,
        "ga": ga,
        "gb": gb,
        "sim": sim,
        "dist": dist,
        "t": t,
        "sg": sg,
        **{f"p_{key}": v for key, v in p.items()},
    }


def _fused_bwd(saved, centering, doa, dob):
    a, b = saved["a"], saved["b"]
    p = {key[2:]: v for key, v in saved.items() if key.startswith("p_") and v is not None}
    dtype = a.dtype
    a3, b3 = _items(a), _items(b)
    nb = a3.shape[0]
    doa3, dob3 = _items(np.asarray(doa, dtype)), _items(np.asarray(dob, dtype))
    fa, fb, ga, gb = saved["fa"], saved["fb"], saved["ga"], saved["gb"]
    da, db = np.empty_like(a3), np.empty_like(b3)
    dfa, dfb, dga, dgb = np.empty_like(fa), np.empty_like(fb), np.zeros_like(ga), np.zeros_like(gb)
    dalpha, dbeta = np.zeros(nb), np.zeros(nb)
    w_e, w_n = np.ascontiguousarray(p["w_e"]), np.ascontiguousarray(p["w_n"])
    parallel = _parallel(a, b, w_e.shape[0])
    flat = functools.partial(flat_rows, np)
    grads = {"w_e": np.empty_like(w_e), "w_n": np.empty_like(w_n)}
    # The weight gradients are products over all items, split by rows of the gradient, in a
    # parallel region as well: threaded NumPy products right after one made both pools spin.
    with single_threaded_blas():
        (_bwd_par if parallel else _bwd_ser)(
            a3,
            b3,
            doa3,
            dob3,
            w_e,
            w_n,
            fa,
            fb,
            ga,
            gb,
            saved["sim"],
            saved["dist"],
            saved["t"],
            saved["sg"],
            _scalar(p, "alpha", dtype),
            _scalar(p, "beta", dtype),
            centering,
            da,
            db,
            dfa,
            dfb,
            dga,
            dgb,
            dalpha,
            dbeta,
        )
        for key, dxa, dxb in (("e", dfa, dfb), ("n", dga, dgb)):
            (_weight_grad_par if parallel else _weight_grad_ser)(
                flat(dxa), flat(a3), flat(dxb), flat(b3), grads[f"w_{key}"]
            )
    for key, dxa, dxb in (("e", dfa, dfb), ("n", dga, dgb)):
        if f"b_{key}" in p:
            grads[f"b_{key}"] = np.sum(flat(dxa), axis=0) + np.sum(flat(dxb), axis=0)
    if "alpha" in p:
        grads["alpha"] = np.reshape(np.sum(dalpha), (1,))
    if "beta" in p:
        grads["beta"] = np.reshape(np.sum(dbeta), (1,))
    grads = {key: np.asarray(g, dtype) for key, g in grads.items()}
    return da.reshape(a.shape), db.reshape(b.shape), grads


def _fwd(xp, arrays, options, save):
    a, b, p = arrays["a"], arrays["b"], arrays["params"]
    if _fused(a, b, p):
        return _fused_fwd(a, b, p, options.centering, save)
    with blas_threads(_parallel(a, b, p["w_n"].shape[0])):
        return coda_forward(xp, a, b, p, options.centering, save, l1=_L1)


def _bwd(xp, saved, options, cts):
    a, b = saved["a"], saved["b"]
    p = {"w_e": saved["p_w_e"], "w_n": saved["p_w_n"]}
    if _fused(a, b, p):
        da, db, dp = _fused_bwd(saved, options.centering, cts[0], cts[1])
    else:
        with blas_threads(_parallel(a, b, p["w_n"].shape[0])):
            da, db, dp = coda_backward(xp, saved, options.centering, cts[0], cts[1], l1=_L1)
    return {"a": da, "b": db, "params": dp}


KERNELS = {"coda": Kernel(_fwd, _bwd)}

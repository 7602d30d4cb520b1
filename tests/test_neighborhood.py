"""Neighbourhood attention 1-D/2-D, SASA block: dense float64 oracles, gradients, backends,
errors."""

from __future__ import annotations

import numpy as np
import pytest

import arrayattn as aa
from arrayattn._gradcheck import directional_errors, numerical_gradient
from support import assert_close_rel, require_kernel, to_numpy, to_xp

NA2 = aa.neighborhood_attention_2d
NA1 = aa.neighborhood_attention_1d


# -- window rules written from the spec (independent of arrayattn's tables) ------------------------


def natten_window_start(i, length, kernel, dilation):
    """NATTEN's legacy CPU ``get_window_start`` (odd kernel), transcribed from its definition."""
    ns = kernel // 2
    if dilation <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    ni = i - ns * dilation
    if ni < 0:
        return i % dilation
    if i + ns * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return ni


def axis_keys(i, length, kernel, dilation, boundary, causal=False):
    """Key positions of query i along one axis (out-of-range positions kept for 'zero')."""
    if causal:
        keys = [i - m * dilation for m in range(kernel - 1, -1, -1)]
    elif boundary == "clamp":
        if kernel % 2:
            start = natten_window_start(i, length, kernel, dilation)
            keys = [start + m * dilation for m in range(kernel)]
        else:  # NATTEN >= 0.17.5 (flex mask): centre clamped in the residue class
            rho, s = i % dilation, i // dilation
            n = len(range(rho, length, dilation))
            left, right = kernel // 2, kernel // 2 - 1
            centre = min(max(s, left), n - 1 - right)
            keys = [(c * dilation + rho) for c in range(centre - left, centre + right + 1)]
    else:
        keys = [i + (m - kernel // 2) * dilation for m in range(kernel)]
    if boundary != "zero":
        keys = [n for n in keys if 0 <= n < length]
    return keys


def dense_oracle(q, k, v, keys_y, keys_x, *, scale, rel_y, rel_x, bias=None, r_h=None, r_w=None):
    """Dense softmax over a zero-padded grid with an explicit boolean neighbourhood mask.

    ``keys_y(i)``/``keys_x(j)`` list key rows/columns (may lie outside: zero keys and values that
    stay in the softmax); ``rel_y(i, n)`` the table row of the pair. q (..., H, W, d).
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    h, w = q.shape[-3:-1]
    pad = max(h, w) + 8
    hp, wp = h + 2 * pad, w + 2 * pad

    def padded(a):
        out = np.zeros(a.shape[:-3] + (hp, wp, a.shape[-1]))
        out[..., pad : pad + h, pad : pad + w, :] = a
        return out.reshape(a.shape[:-3] + (hp * wp, a.shape[-1]))

    kp, vp = padded(k), padded(v)
    qf = q.reshape(q.shape[:-3] + (h * w, q.shape[-1]))
    logits = scale * qf @ np.swapaxes(kp, -1, -2)  # (..., HW, HpWp)
    keep = np.zeros((h * w, hp * wp), dtype=bool)
    extra = np.zeros(q.shape[:-3] + (h * w, hp * wp))
    for i in range(h):
        for j in range(w):
            p = i * w + j
            for ny in keys_y(i):
                for nx in keys_x(j):
                    col = (ny + pad) * wp + (nx + pad)
                    assert not keep[p, col], "a key listed twice"
                    keep[p, col] = True
                    ty, tx = rel_y(i, ny), rel_x(j, nx)
                    if r_h is not None:
                        extra[..., p, col] += np.sum(
                            q[..., i, j, :] * np.asarray(r_h)[..., ty, :], -1
                        )
                    if r_w is not None:
                        extra[..., p, col] += np.sum(
                            q[..., i, j, :] * np.asarray(r_w)[..., tx, :], -1
                        )
                    if bias is not None:
                        extra[..., p, col] += np.asarray(bias)[..., ty, tx]
    s = np.where(keep, logits + extra, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    prob = e / e.sum(-1, keepdims=True)
    out = prob @ vp
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def na2d_oracle(
    q, k, v, *, kernel_size, dilation=1, boundary="clamp", rel_bias=None, rel_pos=None, scale=None
):
    h, w, d = q.shape[-3:]
    scale = 1 / np.sqrt(d) if scale is None else scale
    r_h, r_w = (None, None) if rel_pos is None else rel_pos
    rel = lambda i, n: (n - i) // dilation + kernel_size - 1  # noqa: E731
    return dense_oracle(
        q,
        k,
        v,
        lambda i: axis_keys(i, h, kernel_size, dilation, boundary),
        lambda j: axis_keys(j, w, kernel_size, dilation, boundary),
        scale=scale,
        rel_y=rel,
        rel_x=rel,
        bias=rel_bias,
        r_h=r_h,
        r_w=r_w,
    )


def na1d_oracle(
    q, k, v, *, kernel_size, dilation=1, causal=False, boundary="clamp", rel_bias=None, scale=None
):
    length, d = q.shape[-2:]
    scale = 1 / np.sqrt(d) if scale is None else scale
    bias = None if rel_bias is None else np.asarray(rel_bias)[..., None, :]
    out = dense_oracle(
        q[..., None, :, :],
        k[..., None, :, :],
        v[..., None, :, :],
        lambda i: [0],
        lambda j: axis_keys(j, length, kernel_size, dilation, boundary, causal),
        scale=scale,
        rel_y=lambda i, n: 0,
        rel_x=lambda i, n: (n - i) // dilation + kernel_size - 1,
        bias=bias,
    )
    return out[..., 0, :, :]


def _qkv(rng, shape, dv=None):
    q = rng.standard_normal(shape)
    k = rng.standard_normal(shape)
    v = rng.standard_normal(shape[:-1] + (dv or shape[-1],))
    return q, k, v


# -- forward against the dense oracle --------------------------------------------------------------

CONFIGS_2D = [
    # (H, W, K, dilation, boundary)
    (7, 9, 3, 1, "clamp"),
    (7, 9, 4, 1, "clamp"),
    (9, 11, 3, 2, "clamp"),
    (10, 9, 3, 3, "clamp"),
    (9, 8, 2, 3, "clamp"),
    (3, 5, 3, 1, "clamp"),  # H equal to the window
    (6, 7, 5, 1, "zero"),
    (6, 7, 4, 2, "zero"),
    (5, 6, 3, 3, "zero"),
    (6, 7, 5, 1, "mask"),
    (7, 5, 4, 2, "mask"),
    (4, 4, 7, 1, "zero"),  # window larger than the image
    (4, 4, 7, 1, "mask"),
]


@pytest.mark.parametrize(("h", "w", "kernel", "dil", "boundary"), CONFIGS_2D)
def test_na2d_matches_dense_oracle(backend, rng, h, w, kernel, dil, boundary):
    q, k, v = _qkv(rng, (2, 2, h, w, 3), dv=4)
    t = 2 * kernel - 1
    bias = rng.standard_normal((2, t, t))
    rel = (rng.standard_normal((t, 3)), rng.standard_normal((2, 1, t, 3)))
    kw = dict(kernel_size=kernel, dilation=dil, boundary=boundary)
    for extra in ({}, {"rel_bias": bias, "rel_pos": rel, "scale": 0.7}):
        out = NA2(q, k, v, **kw, **extra)
        assert_close_rel(out, na2d_oracle(q, k, v, **kw, **extra), 1e-12, str(extra.keys()))


CONFIGS_1D = [
    (9, 3, 1, False, "clamp"),
    (9, 4, 1, False, "clamp"),
    (11, 3, 3, False, "clamp"),
    (10, 2, 2, False, "clamp"),
    (7, 4, 2, True, "clamp"),
    (7, 3, 1, True, "zero"),
    (8, 5, 1, False, "zero"),
    (8, 4, 2, False, "mask"),
    (3, 3, 1, False, "clamp"),
]


@pytest.mark.parametrize(("length", "kernel", "dil", "causal", "boundary"), CONFIGS_1D)
def test_na1d_matches_dense_oracle(backend, rng, length, kernel, dil, causal, boundary):
    q, k, v = _qkv(rng, (3, length, 4), dv=2)
    bias = rng.standard_normal((3, 2 * kernel - 1))
    kw = dict(kernel_size=kernel, dilation=dil, causal=causal, boundary=boundary)
    for extra in ({}, {"rel_bias": bias}):
        out = NA1(q, k, v, **kw, **extra)
        assert_close_rel(out, na1d_oracle(q, k, v, **kw, **extra), 1e-12)


def test_natten_clamp_windows_by_hand():
    """Border windows of NATTEN's clamp rule, computed by hand, and the legacy C rule."""
    from arrayattn._reference.neighborhood import na_axis_windows

    def keys(length, kernel, dil, i):
        win = na_axis_windows(length, kernel, dil, "clamp")
        assert win.valid[:, i].all()
        return win.idx[:, i].tolist()

    assert keys(7, 3, 1, 0) == [0, 1, 2]
    assert keys(7, 3, 1, 6) == [4, 5, 6]
    assert keys(7, 3, 1, 3) == [2, 3, 4]
    assert keys(8, 4, 1, 0) == [0, 1, 2, 3]
    assert keys(8, 4, 1, 3) == [1, 2, 3, 4]  # even K: two keys before, one after
    assert keys(8, 4, 1, 7) == [4, 5, 6, 7]
    assert keys(10, 3, 2, 0) == [0, 2, 4]
    assert keys(10, 3, 2, 1) == [1, 3, 5]
    assert keys(10, 3, 2, 8) == [4, 6, 8]
    assert keys(10, 3, 2, 7) == [5, 7, 9]
    assert keys(10, 3, 2, 9) == [5, 7, 9]
    assert keys(11, 3, 3, 10) == [4, 7, 10]
    for length in range(3, 20):
        for kernel in (1, 3, 5):
            for dil in (1, 2, 3):
                if length < kernel * dil:
                    continue
                win = na_axis_windows(length, kernel, dil, "clamp")
                for i in range(length):
                    start = natten_window_start(i, length, kernel, dil)
                    assert win.idx[:, i].tolist() == [start + m * dil for m in range(kernel)]


def test_sasa_relative_tables_match_split_embedding(rng):
    """q·concat(r_row[dy], r_col[dx]) (SASA §2.2) equals the padded pair of full-width tables."""
    kernel, d = 3, 4
    q, k, v = _qkv(rng, (2, 5, 6, d))
    r_row, r_col = rng.standard_normal((kernel, 2)), rng.standard_normal((kernel, 2))
    r_h, r_w = aa.sasa_relative_tables(r_row, r_col)
    out = NA2(q, k, v, kernel_size=kernel, boundary="zero", rel_pos=(r_h, r_w), scale=1.0)
    # oracle with the split embedding directly
    r = kernel // 2
    concat = np.zeros((2 * kernel - 1, 2 * kernel - 1, d))
    for a in range(kernel):
        for b in range(kernel):
            concat[a + kernel - 1 - r, b + kernel - 1 - r] = np.concatenate([r_row[a], r_col[b]])
    bias_free = dense_oracle(
        q,
        k,
        v,
        lambda i: axis_keys(i, 5, kernel, 1, "zero"),
        lambda j: axis_keys(j, 6, kernel, 1, "zero"),
        scale=1.0,
        rel_y=lambda i, n: n - i + kernel - 1,
        rel_x=lambda i, n: n - i + kernel - 1,
        r_h=None,
        r_w=None,
    )
    del bias_free
    # dense with the concatenated table: use r_h = concat rows via a per-pair table
    h, w = 5, 6
    expected = np.zeros(out.shape)
    for bi in range(2):
        for i in range(h):
            for j in range(w):
                logits, vals = [], []
                for ny in axis_keys(i, h, kernel, 1, "zero"):
                    for nx in axis_keys(j, w, kernel, 1, "zero"):
                        inside = 0 <= ny < h and 0 <= nx < w
                        kk = k[bi, ny, nx] if inside else np.zeros(d)
                        vv = v[bi, ny, nx] if inside else np.zeros(d)
                        emb = concat[ny - i + kernel - 1, nx - j + kernel - 1]
                        logits.append(q[bi, i, j] @ kk + q[bi, i, j] @ emb)
                        vals.append(vv)
                p = np.exp(np.array(logits) - max(logits))
                expected[bi, i, j] = (p / p.sum()) @ np.array(vals)
    assert_close_rel(out, expected, 1e-12)


# -- gradients -------------------------------------------------------------------------------------


def _pairing_grad_check(op, args, kwargs, rng, names):
    """Every entry of the listed gradients against central differences (float64, reference;
    the numba kernels' gradients are compared with the reference in test_numba_equals_array_api)."""
    with aa.use_backend("array_api"):
        _pairing_grad_check_here(op, args, kwargs, rng, names)


def _pairing_grad_check_here(op, args, kwargs, rng, names):
    out, res = op.fwd(*args, **kwargs)
    ct = rng.standard_normal(out.shape)
    g = op.bwd(res, ct)
    for name in names:
        if name in ("q", "k", "v"):
            pos = "qkv".index(name)

            def f(x, pos=pos):
                a = list(args)
                a[pos] = x
                return float(np.sum(op(*a, **kwargs) * ct))

            num = numerical_gradient(f, args[pos])
            ana = getattr(g, name)
        elif name == "rel_bias":
            num = numerical_gradient(
                lambda x: float(np.sum(op(*args, **{**kwargs, "rel_bias": x}) * ct)),
                kwargs["rel_bias"],
            )
            ana = g.rel_bias
        else:  # rel_pos entry
            key = name
            rel = kwargs["rel_pos"]

            def f(x, key=key):
                return float(np.sum(op(*args, **{**kwargs, "rel_pos": {**rel, key: x}}) * ct))

            num = numerical_gradient(f, rel[key])
            ana = g.rel_pos[key]
        assert_close_rel(ana, num, 1e-6, name)


@pytest.mark.parametrize(
    ("kernel", "dil", "boundary"),
    [(3, 1, "clamp"), (2, 2, "clamp"), (3, 1, "zero"), (4, 1, "mask")],
)
def test_na2d_gradients_finite_differences(rng, kernel, dil, boundary):
    q, k, v = _qkv(rng, (1, 2, 4, 5, 2), dv=3)
    t = 2 * kernel - 1
    kw = dict(
        kernel_size=kernel,
        dilation=dil,
        boundary=boundary,
        rel_bias=rng.standard_normal((2, t, t)),
        rel_pos={"r_h": rng.standard_normal((t, 2)), "r_w": rng.standard_normal((2, t, 2))},
    )
    _pairing_grad_check(NA2, (q, k, v), kw, rng, ["q", "k", "v", "rel_bias", "r_h", "r_w"])


@pytest.mark.parametrize(
    ("kernel", "dil", "causal", "boundary"),
    [(3, 2, False, "clamp"), (4, 1, True, "zero"), (3, 1, True, "clamp")],
)
def test_na1d_gradients_finite_differences(rng, kernel, dil, causal, boundary):
    q, k, v = _qkv(rng, (2, 7, 2), dv=3)
    kw = dict(
        kernel_size=kernel,
        dilation=dil,
        causal=causal,
        boundary=boundary,
        rel_bias=rng.standard_normal((2 * kernel - 1,)),
    )
    _pairing_grad_check(NA1, (q, k, v), kw, rng, ["q", "k", "v", "rel_bias"])


def test_rel_pos_tuple_form_returns_tuple(rng):
    q, k, v = _qkv(rng, (5, 5, 2))
    rel = (rng.standard_normal((5, 2)), None)
    out, res = NA2.fwd(q, k, v, kernel_size=3, rel_pos=rel)
    g = NA2.bwd(res, np.ones_like(out))
    assert isinstance(g.rel_pos, tuple)
    assert g.rel_pos[1] is None
    assert g.rel_pos[0].shape == (5, 2)


# -- backends --------------------------------------------------------------------------------------


def _all_grads(g):
    out = []
    for f in g._fields:
        x = getattr(g, f)
        if isinstance(x, dict):
            out += [x[key] for key in sorted(x)]
        elif isinstance(x, tuple):
            out += [e for e in x if e is not None]
        elif x is not None:
            out.append(x)
    return out


NUMBA_CASES = [
    (NA2, dict(kernel_size=3, boundary="clamp"), (2, 3, 7, 8, 4)),
    (NA2, dict(kernel_size=4, dilation=2, boundary="clamp"), (1, 2, 9, 8, 3)),
    (NA2, dict(kernel_size=5, boundary="zero"), (1, 2, 6, 7, 3)),
    (NA2, dict(kernel_size=3, dilation=3, boundary="mask"), (2, 1, 7, 8, 3)),
    (NA1, dict(kernel_size=5, causal=True), (2, 3, 12, 4)),
    (NA1, dict(kernel_size=4, dilation=2, boundary="zero"), (3, 11, 4)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(NUMBA_CASES)))
def test_numba_equals_array_api(rng, case, dtype):
    op, kw, shape = NUMBA_CASES[case]
    require_kernel(op, "numba")
    q, k, v = (a.astype(dtype) for a in _qkv(rng, shape, dv=5))
    kernel = kw["kernel_size"]
    t = 2 * kernel - 1
    kw = dict(kw)
    if op is NA2:
        kw["rel_bias"] = rng.standard_normal((shape[1], t, t)).astype(dtype)
        kw["rel_pos"] = {
            "r_h": rng.standard_normal((t, shape[-1])).astype(dtype),
            "r_w": rng.standard_normal((shape[1], t, shape[-1])).astype(dtype),
        }
    else:
        kw["rel_bias"] = rng.standard_normal((t,)).astype(dtype)
    ct = rng.standard_normal(q.shape[:-1] + (5,)).astype(dtype)
    results = {}
    for name in ("array_api", "numba"):
        with aa.use_backend(name):
            out, res = op.fwd(q, k, v, **kw)
            assert res.backend == name
            results[name] = [out] + _all_grads(op.bwd(res, ct))
    # the float64 reference is the oracle for the float32 kernels
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    kw64 = {
        key: (
            val.astype(np.float64)
            if hasattr(val, "astype")
            else {kk: vv.astype(np.float64) for kk, vv in val.items()}
            if isinstance(val, dict)
            else val
        )
        for key, val in kw.items()
    }
    with aa.use_backend("array_api"):
        out, res = op.fwd(q64, k64, v64, **kw64)
        ref = [out] + _all_grads(op.bwd(res, ct.astype(np.float64)))
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for a, b, r in zip(results["numba"], results["array_api"], ref, strict=True):
        assert a.dtype == dtype
        assert_close_rel(a, r, rtol)
        assert_close_rel(b, r, rtol)
    # deterministic: bitwise the same on a second run
    with aa.use_backend("numba"):
        out, res = op.fwd(q, k, v, **kw)
        again = [out] + _all_grads(op.bwd(res, ct))
    for a, b in zip(again, results["numba"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_reference_runs_on_namespace(xp, rng):
    q, k, v = _qkv(rng, (2, 5, 6, 3))
    bias = rng.standard_normal((9, 9))
    rel = {"r_h": rng.standard_normal((9, 3)), "r_w": rng.standard_normal((9, 3))}
    kw = dict(kernel_size=5, boundary="zero", rel_bias=bias, rel_pos=rel)
    ct = rng.standard_normal(v.shape)
    with aa.use_backend("array_api"):
        out, res = NA2.fwd(q, k, v, **kw)
        g = NA2.bwd(res, ct)
        out_x, res_x = NA2.fwd(
            *(to_xp(xp, a) for a in (q, k, v)),
            kernel_size=5,
            boundary="zero",
            rel_bias=to_xp(xp, bias),
            rel_pos=to_xp(xp, rel),
        )
        g_x = NA2.bwd(res_x, to_xp(xp, ct))
    assert_close_rel(to_numpy(out_x), out, 1e-12)
    for a, b in zip(_all_grads(g_x), _all_grads(g), strict=True):
        assert_close_rel(to_numpy(a), b, 1e-12)
    q1, k1, v1 = (a[:, 0] for a in (q, k, v))
    with aa.use_backend("array_api"):
        o1 = NA1(*(to_xp(xp, a) for a in (q1, k1, v1)), kernel_size=3, causal=True)
    assert_close_rel(to_numpy(o1), na1d_oracle(q1, k1, v1, kernel_size=3, causal=True), 1e-12)


# -- edge cases and errors ------------------------------------------------------------------------


def test_huge_logits_and_global_window(backend, rng):
    q, k, v = _qkv(rng, (4, 5, 3))
    out = NA2(q * 1e3, k * 1e3, v, kernel_size=4, boundary="mask")
    assert np.isfinite(out).all()
    # clamp with the kernel equal to the image on both axes is global attention
    q, k, v = _qkv(rng, (3, 3, 2))
    out = NA2(q, k, v, kernel_size=3)
    logits = q.reshape(9, 2) @ k.reshape(9, 2).T / np.sqrt(2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert_close_rel(out, (p @ v.reshape(9, 2)).reshape(3, 3, 2), 1e-12)


def test_read_only_inputs(backend, rng):
    q, k, v = _qkv(rng, (2, 6, 6, 3))
    bias = rng.standard_normal((2, 5, 5))
    copies = [a.copy() for a in (q, k, v, bias)]
    for a in (q, k, v, bias):
        a.flags.writeable = False
    out, res = NA2.fwd(q, k, v, kernel_size=3, rel_bias=bias)
    g = NA2.bwd(res, np.ones_like(out))
    for a, c in zip((q, k, v, bias), copies, strict=True):
        np.testing.assert_array_equal(a, c)
    assert not np.shares_memory(out, q)
    assert not np.shares_memory(g.q, q)


def test_errors(rng):
    q, k, v = _qkv(rng, (2, 6, 7, 3))
    with pytest.raises(ValueError, match="q: boundary='clamp'.*kernel_size"):
        NA2(q, k, v, kernel_size=7)
    with pytest.raises(ValueError, match="q: boundary='clamp'"):
        NA2(q, k, v, kernel_size=3, dilation=3)
    with pytest.raises(ValueError, match="q: boundary='clamp'"):
        NA1(q[0, 0], k[0, 0], v[0, 0], kernel_size=4, dilation=2)
    with pytest.raises(ValueError, match="boundary"):
        NA2(q, k, v, kernel_size=3, boundary="reflect")
    with pytest.raises(ValueError, match="kernel_size"):
        NA2(q, k, v, kernel_size=0)
    with pytest.raises(TypeError, match="kernel_size"):
        NA2(q, k, v, kernel_size=3.0)
    with pytest.raises(ValueError, match="dilation"):
        NA2(q, k, v, kernel_size=3, dilation=0)
    with pytest.raises(ValueError, match="rel_bias"):
        NA2(q, k, v, kernel_size=3, rel_bias=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="rel_bias"):
        NA2(q, k, v, kernel_size=3, rel_bias=np.zeros((3, 5, 5)))
    with pytest.raises(ValueError, match=r"rel_pos\['r_h'\]"):
        NA2(q, k, v, kernel_size=3, rel_pos=(np.zeros((5, 2)), None))
    with pytest.raises(TypeError, match="rel_pos"):
        NA2(q, k, v, kernel_size=3, rel_pos=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="k: expected"):
        NA2(q, k[..., :5, :], v, kernel_size=3)
    with pytest.raises(ValueError, match="v: expected"):
        NA2(q, k, v[..., :5, :], kernel_size=3)
    with pytest.raises(TypeError, match="v: expected dtype"):
        NA2(q, k, v.astype(np.float32), kernel_size=3)
    with pytest.raises(TypeError, match="q"):
        NA2(q.astype(np.int64), k, v, kernel_size=3)
    with pytest.raises(ValueError, match="q"):
        NA2(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], kernel_size=1)
    with pytest.raises(TypeError, match="causal"):
        NA1(q[0, 0], k[0, 0], v[0, 0], kernel_size=3, causal="yes")
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="namespaces"):
        NA2(q, torch.asarray(k), v, kernel_size=3)


# -- SASA block ------------------------------------------------------------------------------------


def _sasa_params(rng, c, cout, heads, kernel, per_head=False):
    params = {f"w_{s}": rng.standard_normal((cout, c, 1, 1)) / 2 for s in "qkv"}
    dh = cout // heads
    shape = (heads, 2 * kernel - 1, dh) if per_head else (2 * kernel - 1, dh)
    params["rel_h"] = rng.standard_normal(shape) / 2
    params["rel_w"] = rng.standard_normal(shape) / 2
    return params


def test_sasa_block_matches_oracle(backend, rng):
    c, cout, heads, kernel = 3, 4, 2, 3
    params = _sasa_params(rng, c, cout, heads, kernel, per_head=True)
    params["b_v"] = rng.standard_normal(cout)
    x = rng.standard_normal((2, c, 5, 6))
    y = aa.sasa_block(x, params, num_heads=heads, kernel_size=kernel)

    def proj(wn, bn=None):
        z = np.einsum("nchw,oc->nhwo", x, params[wn][:, :, 0, 0])
        if bn in params:
            z = z + params[bn]
        return z.reshape(2, 5, 6, heads, cout // heads).transpose(0, 3, 1, 2, 4)

    q, k, v = proj("w_q"), proj("w_k"), proj("w_v", "b_v")
    o = na2d_oracle(
        q,
        k,
        v,
        kernel_size=kernel,
        boundary="zero",
        rel_pos=(params["rel_h"][None], params["rel_w"][None]),
    )
    expected = o.transpose(0, 1, 4, 2, 3).reshape(2, cout, 5, 6)
    assert_close_rel(y, expected, 1e-12)


def test_sasa_block_gradients(backend, rng):
    params = _sasa_params(rng, 3, 4, 2, 3)
    params["b_q"] = rng.standard_normal(4)
    x = rng.standard_normal((1, 3, 4, 5))
    errors = directional_errors(
        aa.sasa_block, (x, params), {"num_heads": 2, "kernel_size": 3}, rng=rng
    )
    assert set(errors) == {"x"} | {f"params[{k!r}]" for k in params}
    assert max(errors.values()) < 1e-6, errors


def test_sasa_block_errors(rng):
    params = _sasa_params(rng, 3, 4, 2, 3)
    x = rng.standard_normal((1, 3, 4, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        aa.sasa_block(x, params, num_heads=2, kernel_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        aa.sasa_block(x, params, num_heads=3, kernel_size=3)
    with pytest.raises(ValueError, match="rel_h"):
        aa.sasa_block(x, {**params, "rel_h": np.zeros((4, 2))}, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match="w_v"):
        aa.sasa_block(
            x, {k: a for k, a in params.items() if k != "w_v"}, num_heads=2, kernel_size=3
        )
    with pytest.raises(ValueError, match="extra"):
        aa.sasa_block(x, {**params, "extra": np.zeros(2)}, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match="x"):
        aa.sasa_block(x[0], params, num_heads=2, kernel_size=3)

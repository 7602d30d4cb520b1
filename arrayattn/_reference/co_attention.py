"""Array-API reference of COSNet co-attention, CoDA and CAN cross attention.

Plain ``xp.*`` code, no in-place writes. Conventions: images ``(N, C, H, W)`` flattened to
``(N, C, P)``; sequences ``(..., L, d)``.

* COSNet ``'paper'``: ``Z_a`` and ``Z_b`` take the two softmaxes (over query and over exemplar
  positions) of one affinity map ``S = V_bᵀ W V_a``. Up to ``DENSE_MAX_PAIRS`` pairs per item the
  Pb×Pa map is formed once and feeds both, as in the official code (3 large products forward,
  6 backward); beyond, each softmax is an attention core run through
  :func:`arrayattn.scaled_dot_product_attention` (``Z_a``: q = W a, k = v = b; ``Z_b``: q = b,
  k = W a, v = a), so memory stays linear in the positions. ``'code'``: the second softmax is of
  probabilities, so the map is always dense.
* CoDA: dense La×Lb quasi-attention; the L1 distances use an (La, Lb, k) intermediate here.
  They are the one part that is not a matrix product, so ``coda_forward``/``coda_backward`` take
  them as a pair of functions (``l1=``) that a backend replaces by fused loops.
* CAN: dense m×m correlation (m = H·W, 36 in the paper).
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, compute_dtype, device_of, flat_rows
from .non_local import flat, transpose

__all__ = [
    "can_backward",
    "can_forward",
    "coattn_backward",
    "coattn_forward",
    "coda_backward",
    "coda_forward",
]


def _c(xp: Any, a: Array, dtype: Any) -> Array:
    return xp.astype(a, dtype, copy=False)


def _softmax(xp: Any, s: Array, axis: int) -> Array:
    e = xp.exp(s - xp.max(s, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def _softmax_bwd(xp: Any, p: Array, dp: Array, axis: int) -> Array:
    return p * (dp - xp.sum(dp * p, axis=axis, keepdims=True))


def _sigmoid(xp: Any, x: Array) -> Array:
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# -- COSNet co-attention --------------------------------------------------------------------------

#: Most Pb·Pa pairs per item for which COSNet's 'paper' mode forms the dense affinity map (16 MiB
#: in float32); a larger call runs two attention cores instead (the choice depends on the shapes
#: only).
DENSE_MAX_PAIRS = 1 << 22


def _gate_fwd(xp, z, wg, bg):
    """``z ⊙ σ(w_g · z + b_g)``; z (N, C, P), wg (C,) -> (out, gate (N, 1, P))."""
    pre = xp.sum(wg[:, None] * z, axis=1, keepdims=True)
    if bg is not None:
        pre = pre + bg
    gate = _sigmoid(xp, pre)
    return z * gate, gate


def _gate_bwd(xp, z, gate, wg, dout):
    """(dz, dwg (C,), dbg scalar) of :func:`_gate_fwd`."""
    dgate = xp.sum(dout * z, axis=1, keepdims=True)
    dpre = dgate * gate * (1.0 - gate)
    dz = dout * gate + wg[:, None] * dpre
    dwg = xp.sum(dpre * z, axis=(0, 2))
    return dz, dwg, xp.sum(dpre)


def coattn_forward(
    xp: Any, a: Array, b: Array, p: dict[str, Array], second_softmax: str, save: bool, *, sdpa: Any
) -> tuple[tuple[Array, Array], dict[str, Any]]:

    dtype = a.dtype
    cdt = compute_dtype(xp, dtype)
    af, bf = _c(xp, flat(xp, a), cdt), _c(xp, flat(xp, b), cdt)
    w = _c(xp, p["w"], cdt)
    wg = _c(xp, p["w_gate"], cdt)[0, :, 0, 0]
    bg = _c(xp, p["b_gate"], cdt)[0] if "b_gate" in p else None
    wa = xp.matmul(w, af)  # (N, C, Pa): W a_j
    saved: dict[str, Any] = {}
    pairs = bf.shape[-1] * af.shape[-1]
    if second_softmax == "paper" and pairs > DENSE_MAX_PAIRS:
        qa, kb = _c(xp, transpose(xp, wa), dtype), _c(xp, transpose(xp, bf), dtype)
        va = _c(xp, transpose(xp, af), dtype)
        if save:
            oa, saved["attn_a"] = sdpa.fwd(qa, kb, kb, scale=1.0)
            ob, saved["attn_b"] = sdpa.fwd(kb, qa, va, scale=1.0)
        else:
            oa, ob = sdpa(qa, kb, kb, scale=1.0), sdpa(kb, qa, va, scale=1.0)
        za, zb = _c(xp, transpose(xp, oa), cdt), _c(xp, transpose(xp, ob), cdt)
    else:
        s = xp.matmul(transpose(xp, bf), wa)  # (N, Pb, Pa): S_ij = b_i · W a_j
        pr = _softmax(xp, s, 2)  # over exemplar positions j (the code's A = softmax(Sᵀ, dim=1))
        if second_softmax == "paper":
            bmat = _softmax(xp, s, 1)  # over query positions i
        else:
            bmat = _softmax(
                xp, pr, 1
            )  # the code's B: softmax over query positions of probabilities
        za = xp.matmul(bf, bmat)  # (N, C, Pa)
        zb = xp.matmul(af, transpose(xp, pr))  # (N, C, Pb)
        if save:
            saved.update(pr=pr, bmat=bmat)
    outa, gate_a = _gate_fwd(xp, za, wg, bg)
    outb, gate_b = _gate_fwd(xp, zb, wg, bg)
    outs = (
        xp.astype(xp.reshape(outa, tuple(a.shape)), dtype),
        xp.astype(xp.reshape(outb, tuple(b.shape)), dtype),
    )
    if save:
        saved.update(a=a, b=b, za=za, zb=zb, gate_a=gate_a, gate_b=gate_b, wa=wa)
        saved.update({f"p_{k}": v for k, v in p.items()})
    return outs, saved


def coattn_backward(
    xp: Any, saved: dict[str, Any], second_softmax: str, douta: Array, doutb: Array, *, sdpa: Any
) -> tuple[Array, Array, dict[str, Array]]:

    a, b = saved["a"], saved["b"]
    p = {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}
    dtype = a.dtype
    cdt = compute_dtype(xp, dtype)
    af, bf = _c(xp, flat(xp, a), cdt), _c(xp, flat(xp, b), cdt)
    w = _c(xp, p["w"], cdt)
    wg = _c(xp, p["w_gate"], cdt)[0, :, 0, 0]
    dza, dwg_a, dbg_a = _gate_bwd(
        xp, saved["za"], saved["gate_a"], wg, _c(xp, flat(xp, douta), cdt)
    )
    dzb, dwg_b, dbg_b = _gate_bwd(
        xp, saved["zb"], saved["gate_b"], wg, _c(xp, flat(xp, doutb), cdt)
    )
    if "attn_a" in saved:  # 'paper' through attention cores
        ga = sdpa.bwd(saved["attn_a"], _c(xp, transpose(xp, dza), dtype))
        gb = sdpa.bwd(saved["attn_b"], _c(xp, transpose(xp, dzb), dtype))
        dwa = transpose(xp, _c(xp, ga.q, cdt) + _c(xp, gb.k, cdt))
        dbf = transpose(xp, _c(xp, ga.k, cdt) + _c(xp, ga.v, cdt) + _c(xp, gb.q, cdt))
        daf = transpose(xp, _c(xp, gb.v, cdt))
    else:
        pr, bmat, wa = saved["pr"], saved["bmat"], saved["wa"]
        dbmat = xp.matmul(transpose(xp, bf), dza)  # (N, Pb, Pa)
        dbf = xp.matmul(dza, transpose(xp, bmat))
        dpr = xp.matmul(transpose(xp, dzb), af)
        daf = xp.matmul(dzb, pr)
        if second_softmax == "paper":  # both softmaxes of S
            ds = _softmax_bwd(xp, bmat, dbmat, 1) + _softmax_bwd(xp, pr, dpr, 2)
        else:  # B = softmax of the probabilities pr
            ds = _softmax_bwd(xp, pr, dpr + _softmax_bwd(xp, bmat, dbmat, 1), 2)
        dbf = dbf + xp.matmul(wa, transpose(xp, ds))
        dwa = xp.matmul(bf, ds)  # (N, C, Pa)
    dw = xp.sum(xp.matmul(dwa, transpose(xp, af)), axis=0)
    daf = daf + xp.matmul(transpose(xp, w), dwa)
    grads = {"w": dw, "w_gate": xp.reshape(dwg_a + dwg_b, tuple(p["w_gate"].shape))}
    if "b_gate" in p:
        grads["b_gate"] = xp.reshape(dbg_a + dbg_b, (1,))
    da = xp.astype(xp.reshape(daf, tuple(a.shape)), dtype)
    db = xp.astype(xp.reshape(dbf, tuple(b.shape)), dtype)
    return da, db, {k: xp.astype(v, dtype) for k, v in grads.items()}


# -- CoDA -----------------------------------------------------------------------------------------


def _lin(xp, x, w, bias, cdt):
    y = xp.matmul(x, xp.matrix_transpose(_c(xp, w, cdt)))
    return y if bias is None else y + _c(xp, bias, cdt)


def _scalar(xp, p, key, cdt, like):
    if key in p:
        return xp.reshape(_c(xp, p[key], cdt), ())
    return xp.ones((), dtype=cdt, device=device_of(like))


def l1_distances(xp: Any, ga: Array, gb: Array) -> Array:
    """``dist[..., i, j] = ‖ga[..., i, :] − gb[..., j, :]‖₁`` through an (..., La, Lb, k)
    intermediate."""
    return xp.sum(xp.abs(ga[..., :, None, :] - gb[..., None, :, :]), axis=-1)


def l1_distances_backward(xp: Any, ga: Array, gb: Array, ddist: Array) -> tuple[Array, Array]:
    """VJP of :func:`l1_distances`: ``dga_i = Σ_j ddist_ij sign(ga_i − gb_j)``, ``dgb_j = −Σ_i …``
    (subgradient 0 at a tie)."""
    sgn = xp.sign(ga[..., :, None, :] - gb[..., None, :, :])  # (..., La, Lb, k)
    return xp.sum(ddist[..., None] * sgn, axis=-2), -xp.sum(ddist[..., None] * sgn, axis=-3)


_L1 = (l1_distances, l1_distances_backward)


def _pair_mean(xp: Any, x: Array) -> Array:
    """Mean over the last two axes; 0 (not NaN with a warning) when La or Lb is 0."""
    return xp.sum(x, axis=(-2, -1), keepdims=True) / max(x.shape[-2] * x.shape[-1], 1)


def coda_forward(
    xp: Any, a: Array, b: Array, p: dict[str, Array], centering: bool, save: bool, *, l1=_L1
) -> tuple[tuple[Array, Array], dict[str, Any]]:
    dtype = a.dtype
    cdt = compute_dtype(xp, dtype)
    ac, bc = _c(xp, a, cdt), _c(xp, b, cdt)
    alpha, beta = _scalar(xp, p, "alpha", cdt, a), _scalar(xp, p, "beta", cdt, a)
    fa, fb = _lin(xp, ac, p["w_e"], p.get("b_e"), cdt), _lin(xp, bc, p["w_e"], p.get("b_e"), cdt)
    ga, gb = _lin(xp, ac, p["w_n"], p.get("b_n"), cdt), _lin(xp, bc, p["w_n"], p.get("b_n"), cdt)
    sim = xp.matmul(fa, xp.matrix_transpose(fb))  # F_E(a_i)ᵀ F_E(b_j)
    dist = l1[0](xp, ga, gb)  # ‖F_N(a_i) − F_N(b_j)‖₁ (..., La, Lb)
    e = alpha * sim
    nn = -beta * dist
    if centering:
        nn = nn - _pair_mean(xp, nn)
    t, sg = xp.tanh(e), _sigmoid(xp, nn)
    m = t * sg
    oa = xp.matmul(m, bc)  # A' = M B
    ob = xp.matmul(xp.matrix_transpose(m), ac)  # B' = Mᵀ A
    saved = {}
    if save:
        saved = {
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
            **{f"p_{k}": v for k, v in p.items()},
        }
    return (xp.astype(oa, dtype), xp.astype(ob, dtype)), saved


def _lin_bwd(xp, x, dy, with_bias):
    """(dw, db) of ``y = x wᵀ + b`` summed over every leading axis."""
    fx, fdy = flat_rows(xp, x), flat_rows(xp, dy)
    return xp.matmul(xp.matrix_transpose(fdy), fx), (xp.sum(fdy, axis=0) if with_bias else None)


def coda_backward(
    xp: Any, saved: dict[str, Any], centering: bool, doa: Array, dob: Array, *, l1=_L1
) -> tuple[Array, Array, dict[str, Array]]:
    a, b = saved["a"], saved["b"]
    p = {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}
    dtype = a.dtype
    cdt = compute_dtype(xp, dtype)
    ac, bc = _c(xp, a, cdt), _c(xp, b, cdt)
    doa, dob = _c(xp, doa, cdt), _c(xp, dob, cdt)
    t, sg = saved["t"], saved["sg"]
    m = t * sg
    alpha, beta = _scalar(xp, p, "alpha", cdt, a), _scalar(xp, p, "beta", cdt, a)
    dm = xp.matmul(doa, xp.matrix_transpose(bc)) + xp.matmul(ac, xp.matrix_transpose(dob))
    da = xp.matmul(m, dob)
    db = xp.matmul(xp.matrix_transpose(m), doa)
    de = dm * sg * (1.0 - t * t)
    dn = dm * t * sg * (1.0 - sg)
    if centering:
        dn = dn - _pair_mean(xp, dn)
    grads: dict[str, Array] = {}
    if "alpha" in p:
        grads["alpha"] = xp.reshape(xp.sum(de * saved["sim"]), (1,))
    if "beta" in p:
        grads["beta"] = xp.reshape(-xp.sum(dn * saved["dist"]), (1,))
    dsim = alpha * de
    ddist = -beta * dn
    fa, fb, ga, gb = saved["fa"], saved["fb"], saved["ga"], saved["gb"]
    dfa = xp.matmul(dsim, fb)
    dfb = xp.matmul(xp.matrix_transpose(dsim), fa)
    dga, dgb = l1[1](xp, ga, gb, ddist)
    for key, dxa, dxb in (("e", dfa, dfb), ("n", dga, dgb)):
        w = _c(xp, p[f"w_{key}"], cdt)
        da = da + xp.matmul(dxa, w)
        db = db + xp.matmul(dxb, w)
        dwa, dba = _lin_bwd(xp, ac, dxa, f"b_{key}" in p)
        dwb, dbb = _lin_bwd(xp, bc, dxb, f"b_{key}" in p)
        grads[f"w_{key}"] = dwa + dwb
        if dba is not None:
            grads[f"b_{key}"] = dba + dbb
    return (
        xp.astype(da, dtype),
        xp.astype(db, dtype),
        {k: xp.astype(v, dtype) for k, v in grads.items()},
    )


# -- CAN cross attention ---------------------------------------------------------------------------

_EPS = 1e-12  # F.normalize's eps in the official code


def _normalize(xp, x):
    """``x / max(‖x‖₂, eps)`` over channels (axis 1) of (N, C, m); returns (y, norm)."""
    norm = xp.sqrt(xp.sum(x * x, axis=1, keepdims=True))
    return x / xp.maximum(norm, xp.asarray(_EPS, dtype=x.dtype, device=device_of(x))), norm


def _normalize_bwd(xp, y, norm, dy):
    big = norm > _EPS
    safe = xp.where(big, norm, xp.ones((), dtype=norm.dtype, device=device_of(norm)))
    d_big = (dy - y * xp.sum(y * dy, axis=1, keepdims=True)) / safe
    return xp.where(big, d_big, dy / _EPS)


def _can_side(xp, r, w1, b1, w2, b2, tau):
    """Attention over the rows i of a correlation map r (N, mi, mj): returns A (N, mi) and cache."""
    mj = r.shape[-1]
    g = xp.mean(r, axis=-2)  # GAP over i -> (N, mj)
    hpre = xp.matmul(g, xp.matrix_transpose(w1))
    if b1 is not None:
        hpre = hpre + b1
    h = xp.where(hpre > 0, hpre, xp.zeros((), dtype=hpre.dtype, device=device_of(hpre)))
    k = xp.matmul(h, xp.matrix_transpose(w2))  # meta-fusion kernel over j
    if b2 is not None:
        k = k + b2
    s = xp.sum(r * k[:, None, :], axis=-1) / mj  # mean_j R_ij w_j
    att = _softmax(xp, s / tau, 1)
    return att, (g, hpre, h, k)


def _can_side_bwd(xp, r, w1, w2, cache, att, datt, tau):
    g, hpre, h, k = cache
    mi, mj = r.shape[-2], r.shape[-1]
    ds = _softmax_bwd(xp, att, datt, 1) / tau
    dr = ds[:, :, None] * k[:, None, :] / mj
    dk = xp.sum(r * ds[:, :, None], axis=-2) / mj  # (N, mj)
    dw2 = xp.matmul(xp.matrix_transpose(dk), h)
    db2 = xp.sum(dk, axis=0)
    dh = xp.matmul(dk, w2)
    dhpre = xp.where(hpre > 0, dh, xp.zeros((), dtype=dh.dtype, device=device_of(dh)))
    dw1 = xp.matmul(xp.matrix_transpose(dhpre), g)
    db1 = xp.sum(dhpre, axis=0)
    dg = xp.matmul(dhpre, w1)
    dr = dr + dg[:, None, :] / mi
    return dr, dw1, db1, dw2, db2


def _can_weights(xp, p, cdt):
    w1, w2 = _c(xp, p["w1"], cdt), _c(xp, p["w2"], cdt)
    w1 = xp.reshape(w1, (w1.shape[0], w1.shape[1]))
    w2 = xp.reshape(w2, (w2.shape[0], w2.shape[1]))
    b1 = _c(xp, p["b1"], cdt) if "b1" in p else None
    b2 = _c(xp, p["b2"], cdt) if "b2" in p else None
    return w1, b1, w2, b2


def can_forward(
    xp: Any, fp: Array, fq: Array, p: dict[str, Array], tau: float, save: bool
) -> tuple[tuple[Array, Array], dict[str, Any]]:
    dtype = fp.dtype
    cdt = compute_dtype(xp, dtype)
    P, Q = _c(xp, flat(xp, fp), cdt), _c(xp, flat(xp, fq), cdt)
    pn, pnorm = _normalize(xp, P)
    qn, qnorm = _normalize(xp, Q)
    r = xp.matmul(transpose(xp, pn), qn)  # (N, m_p, m_q): cosine of P_i and Q_j
    w1, b1, w2, b2 = _can_weights(xp, p, cdt)
    ap, _ = _can_side(xp, r, w1, b1, w2, b2, tau)
    aq, _ = _can_side(xp, transpose(xp, r), w1, b1, w2, b2, tau)
    outp = P * (1.0 + ap[:, None, :])
    outq = Q * (1.0 + aq[:, None, :])
    outs = (
        xp.astype(xp.reshape(outp, tuple(fp.shape)), dtype),
        xp.astype(xp.reshape(outq, tuple(fq.shape)), dtype),
    )
    saved = {}
    if save:
        saved = {"p": fp, "q": fq, **{f"p_{k}": v for k, v in p.items()}}
    return outs, saved


def can_backward(
    xp: Any, saved: dict[str, Any], tau: float, dop: Array, doq: Array
) -> tuple[Array, Array, dict[str, Array]]:
    fp, fq = saved["p"], saved["q"]
    p = {k[2:]: v for k, v in saved.items() if k.startswith("p_") and v is not None}
    dtype = fp.dtype
    cdt = compute_dtype(xp, dtype)
    P, Q = _c(xp, flat(xp, fp), cdt), _c(xp, flat(xp, fq), cdt)
    dop, doq = _c(xp, flat(xp, dop), cdt), _c(xp, flat(xp, doq), cdt)
    # recompute the (small, m×m) forward
    pn, pnorm = _normalize(xp, P)
    qn, qnorm = _normalize(xp, Q)
    r = xp.matmul(transpose(xp, pn), qn)
    rt = transpose(xp, r)
    w1, b1, w2, b2 = _can_weights(xp, p, cdt)
    ap, cache_p = _can_side(xp, r, w1, b1, w2, b2, tau)
    aq, cache_q = _can_side(xp, rt, w1, b1, w2, b2, tau)
    dP = dop * (1.0 + ap[:, None, :])
    dQ = doq * (1.0 + aq[:, None, :])
    dap = xp.sum(dop * P, axis=1)
    daq = xp.sum(doq * Q, axis=1)
    dr, dw1, db1, dw2, db2 = _can_side_bwd(xp, r, w1, w2, cache_p, ap, dap, tau)
    drt, dw1q, db1q, dw2q, db2q = _can_side_bwd(xp, rt, w1, w2, cache_q, aq, daq, tau)
    dr = dr + transpose(xp, drt)
    dpn = xp.matmul(qn, transpose(xp, dr))  # (N, C, m_p)
    dqn = xp.matmul(pn, dr)  # (N, C, m_q)
    dP = dP + _normalize_bwd(xp, pn, pnorm, dpn)
    dQ = dQ + _normalize_bwd(xp, qn, qnorm, dqn)
    grads = {
        "w1": xp.reshape(dw1 + dw1q, tuple(p["w1"].shape)),
        "w2": xp.reshape(dw2 + dw2q, tuple(p["w2"].shape)),
    }
    if "b1" in p:
        grads["b1"] = db1 + db1q
    if "b2" in p:
        grads["b2"] = db2 + db2q
    dfp = xp.astype(xp.reshape(dP, tuple(fp.shape)), dtype)
    dfq = xp.astype(xp.reshape(dQ, tuple(fq.shape)), dtype)
    return dfp, dfq, {k: xp.astype(v, dtype) for k, v in grads.items()}

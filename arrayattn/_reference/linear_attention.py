"""Array-API reference of efficient attention (Shen et al.) and linear attention (Katharopoulos).

Both are ``Q̂ (K̂ᵀ V)``: the (d × dv) context is formed first, so time and memory are linear in the
sequence length. The causal linear attention runs chunk by chunk: inside a chunk of ``C``
positions the masked products are formed explicitly (C × C), across chunks the prefix state
``S = Σ φ(k_j) v_jᵀ``, ``z = Σ φ(k_j)`` is carried. Its backward runs two passes, a forward one for
``dq`` (recomputing the prefix states) and a reverse one for ``dk``, ``dv`` (carrying the suffix
sums ``dS = Σ_{i≥j} φ(q_i) dnum_iᵀ``, ``dz = Σ_{i≥j} dden_i φ(q_i)``), so no prefix state is ever
stored.
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, compute_dtype, device_of

__all__ = [
    "efficient_backward",
    "efficient_forward",
    "linear_backward",
    "linear_forward",
]

#: Chunk length of the causal linear attention.
CHUNK = 128


def _softmax(xp: Any, x: Array, axis: int) -> Array:
    m = xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(x - m)
    return e / xp.sum(e, axis=axis, keepdims=True)


def efficient_forward(xp: Any, q: Array, k: Array, v: Array):
    """Returns ``(out, q̃, k̃, g)``: ``out = q̃ g``, ``g = k̃ᵀ v`` with q̃ = softmax over the features
    of q, k̃ = softmax over the positions of k."""
    cdt = compute_dtype(xp, q.dtype)
    qc, kc, vc = (xp.astype(a, cdt, copy=False) for a in (q, k, v))
    qs = _softmax(xp, qc, -1)
    ks = _softmax(xp, kc, -2)
    g = xp.matmul(xp.matrix_transpose(ks), vc)
    return xp.astype(xp.matmul(qs, g), q.dtype), qs, ks, g


def efficient_backward(xp: Any, qs: Array, ks: Array, g: Array, v: Array, dout: Array, dtype):
    """Returns ``(dq, dk, dv)`` (derivation: docs/derivations/linear_attention.rst) from the saved
    ``q̃, k̃, g`` and ``v``."""
    cdt = qs.dtype
    doc = xp.astype(dout, cdt, copy=False)
    vc = xp.astype(v, cdt, copy=False)
    dqs = xp.matmul(doc, xp.matrix_transpose(g))
    dg = xp.matmul(xp.matrix_transpose(qs), doc)
    dks = xp.matmul(vc, xp.matrix_transpose(dg))
    dv = xp.matmul(ks, dg)
    dq = qs * (dqs - xp.sum(dqs * qs, axis=-1, keepdims=True))
    dk = ks * (dks - xp.sum(dks * ks, axis=-2, keepdims=True))
    return xp.astype(dq, dtype), xp.astype(dk, dtype), xp.astype(dv, dtype)


# -- linear attention ---------------------------------------------------------------------------


def _phi(xp, x):
    """elu(x) + 1."""
    return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, xp.zeros_like(x))))


def _dphi(xp, x):
    return xp.where(x > 0, xp.ones_like(x), xp.exp(xp.minimum(x, xp.zeros_like(x))))


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _tril(xp, n, dev):
    idx = xp.arange(n, device=dev)
    return idx[None, :] <= idx[:, None]


def linear_forward(
    xp: Any, q: Array, k: Array, v: Array, *, causal: bool, eps: float, chunk: int | None = None
):
    """Returns ``(out, den)``: out (..., L, dv) in q's dtype, den (..., L) the denominators
    ``φ(q_i)·z_i + eps`` in the compute dtype."""
    chunk = chunk or CHUNK
    cdt = compute_dtype(xp, q.dtype)
    qc, kc, vc = (xp.astype(a, cdt, copy=False) for a in (q, k, v))
    fq, fk = _phi(xp, qc), _phi(xp, kc)
    if not causal:
        s = xp.matmul(xp.matrix_transpose(fk), vc)  # (..., d, dv)
        z = xp.sum(fk, axis=-2)  # (..., d)
        num = xp.matmul(fq, s)
        den = xp.sum(fq * z[..., None, :], axis=-1) + eps
        return xp.astype(num / den[..., None], q.dtype), den
    dev = device_of(q)
    batch, d, dv = tuple(q.shape[:-2]), q.shape[-1], v.shape[-1]
    s = xp.zeros(batch + (d, dv), dtype=cdt, device=dev)
    z = xp.zeros(batch + (1, d), dtype=cdt, device=dev)
    outs, dens = [], []
    for i0, i1 in _chunks(q.shape[-2], chunk):
        fqc, fkc, vcc = fq[..., i0:i1, :], fk[..., i0:i1, :], vc[..., i0:i1, :]
        a = xp.where(_tril(xp, i1 - i0, dev), xp.matmul(fqc, xp.matrix_transpose(fkc)), 0.0)
        num = xp.matmul(fqc, s) + xp.matmul(a, vcc)
        den = xp.sum(fqc * z, axis=-1) + xp.sum(a, axis=-1) + eps
        outs.append(num / den[..., None])
        dens.append(den)
        s = s + xp.matmul(xp.matrix_transpose(fkc), vcc)
        z = z + xp.sum(fkc, axis=-2, keepdims=True)
    if not outs:
        return xp.zeros(batch + (0, dv), dtype=q.dtype, device=dev), xp.zeros(
            batch + (0,), dtype=cdt, device=dev
        )
    return xp.astype(xp.concat(outs, axis=-2), q.dtype), xp.concat(dens, axis=-1)


def linear_backward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    den: Array,
    dout: Array,
    *,
    causal: bool,
    chunk: int | None = None,
):
    """Returns ``(dq, dk, dv)`` (derivation: docs/derivations/linear_attention.rst) in the input
    dtypes."""
    chunk = chunk or CHUNK
    cdt = compute_dtype(xp, q.dtype)
    qc, kc, vc = (xp.astype(a, cdt, copy=False) for a in (q, k, v))
    doc = xp.astype(dout, cdt, copy=False)
    fq, fk = _phi(xp, qc), _phi(xp, kc)
    dnum = doc / den[..., None]
    dden = -xp.sum(doc * xp.astype(out, cdt, copy=False), axis=-1) / den  # (..., L)
    if not causal:
        s = xp.matmul(xp.matrix_transpose(fk), vc)
        z = xp.sum(fk, axis=-2)
        dfq = xp.matmul(dnum, xp.matrix_transpose(s)) + dden[..., None] * z[..., None, :]
        ds = xp.matmul(xp.matrix_transpose(fq), dnum)  # (..., d, dv)
        dz = xp.sum(dden[..., None] * fq, axis=-2)  # (..., d)
        dfk = xp.matmul(vc, xp.matrix_transpose(ds)) + dz[..., None, :]
        dvv = xp.matmul(fk, ds)
    else:
        dev = device_of(q)
        batch, d, dv = tuple(q.shape[:-2]), q.shape[-1], v.shape[-1]
        ranges = _chunks(q.shape[-2], chunk)

        def pieces(i0, i1):
            tril = _tril(xp, i1 - i0, dev)
            dn, dd = dnum[..., i0:i1, :], dden[..., i0:i1, None]
            # g_ij = dnum_i · v_j + dden_i: the gradient of a_ij = φ(q_i)·φ(k_j), j <= i
            gm = xp.where(tril, xp.matmul(dn, xp.matrix_transpose(vc[..., i0:i1, :])) + dd, 0.0)
            return tril, dn, dd, gm

        # forward pass: dφ(q_i) = Σ_{j<=i} g_ij φ(k_j), with the prefix state (S, z) carried
        s = xp.zeros(batch + (d, dv), dtype=cdt, device=dev)
        z = xp.zeros(batch + (1, d), dtype=cdt, device=dev)
        dfq_parts = []
        for i0, i1 in ranges:
            _, dn, dd, gm = pieces(i0, i1)
            fkc = fk[..., i0:i1, :]
            dfq_parts.append(xp.matmul(gm, fkc) + xp.matmul(dn, xp.matrix_transpose(s)) + dd * z)
            s = s + xp.matmul(xp.matrix_transpose(fkc), vc[..., i0:i1, :])
            z = z + xp.sum(fkc, axis=-2, keepdims=True)
        # reverse pass: dφ(k_j) = Σ_{i>=j} g_ij φ(q_i), dv_j = Σ_{i>=j} a_ij dnum_i, with the
        # suffix sums (dS, dz) carried
        ds = xp.zeros(batch + (d, dv), dtype=cdt, device=dev)
        dz = xp.zeros(batch + (1, d), dtype=cdt, device=dev)
        dfk_parts, dv_parts = [], []
        for i0, i1 in reversed(ranges):
            tril, dn, dd, gm = pieces(i0, i1)
            fqc, fkc = fq[..., i0:i1, :], fk[..., i0:i1, :]
            a = xp.where(tril, xp.matmul(fqc, xp.matrix_transpose(fkc)), 0.0)
            dfk_parts.append(
                xp.matmul(xp.matrix_transpose(gm), fqc)
                + xp.matmul(vc[..., i0:i1, :], xp.matrix_transpose(ds))
                + dz
            )
            dv_parts.append(xp.matmul(xp.matrix_transpose(a), dn) + xp.matmul(fkc, ds))
            ds = ds + xp.matmul(xp.matrix_transpose(fqc), dn)
            dz = dz + xp.sum(dd * fqc, axis=-2, keepdims=True)
        if ranges:
            dfq = xp.concat(dfq_parts, axis=-2)
            dfk = xp.concat(dfk_parts[::-1], axis=-2)
            dvv = xp.concat(dv_parts[::-1], axis=-2)
        else:
            dfq, dfk, dvv = fq, fk, vc  # empty (L = 0)
    dq = dfq * _dphi(xp, qc)
    dk = dfk * _dphi(xp, kc)
    return xp.astype(dq, q.dtype), xp.astype(dk, k.dtype), xp.astype(dvv, v.dtype)

"""Numba kernels of Luong (concat, local) and Bahdanau attention.

* Additive scores (Luong ``concat``, Bahdanau): the projections ``qa = W h_t + b`` (T×d_a) and
  ``kb = U h_s`` (S×d_a) are BLAS products; the scores ``v · tanh(qa_t + kb_s)`` are a fused loop
  per (batch, target step), so the T×S×d_a tensor never exists, and backward recomputes ``tanh``
  in two deterministic passes (one parallel over target steps for ``dqa``/``dv``, one over source
  positions for ``dkb``), never scatter-adding across threads.
* Local attention (local-m / local-p; dot, general or concat scores): scores, softmax, Gaussian
  and context are evaluated only inside each step's window of 2D+1 positions; the dense
  (..., T, S) weights are written because they are the op's output. Backward: pass 1, parallel
  over (batch, step), does the window softmax VJP, ``dp_t`` and the query-side gradients; pass 2,
  parallel over batch and serial over steps, scatters into the source-side gradients.

Arithmetic runs in the input dtype (float32 or float64); other dtypes are left to ``array_api``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._op import Kernel

__all__ = ["KERNELS"]


# -- jitted loops ----------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _additive_fwd(qa, kb, v, keep, probs):
    nb, nt, da = qa.shape
    ns = kb.shape[1]
    for idx in prange(nb * nt):
        b, t = idx // nt, idx % nt
        row = probs[b, t]
        m = -np.inf
        for s in range(ns):
            if keep[b, t, s]:
                z = 0.0
                for a in range(da):
                    z += v[a] * math.tanh(qa[b, t, a] + kb[b, s, a])
                row[s] = z
                if z > m:
                    m = z
        if m == -np.inf:
            m = 0.0  # nothing kept: the row stays 0
        total = 0.0
        for s in range(ns):
            if keep[b, t, s]:
                e = math.exp(row[s] - m)
                row[s] = e
                total += e
        if total > 0:
            for s in range(ns):
                row[s] = row[s] / total


@njit(cache=True, parallel=True)
def _additive_bwd_q(qa, kb, v, dz, dqa, dv_part):
    nb, nt, da = qa.shape
    ns = kb.shape[1]
    for idx in prange(nb * nt):
        b, t = idx // nt, idx % nt
        for s in range(ns):
            g_s = dz[b, t, s]
            if g_s == 0.0:
                continue
            for a in range(da):
                g = math.tanh(qa[b, t, a] + kb[b, s, a])
                dqa[b, t, a] += g_s * v[a] * (1.0 - g * g)
                dv_part[b, t, a] += g_s * g


@njit(cache=True, parallel=True)
def _additive_bwd_k(qa, kb, v, dz, dkb):
    nb, nt, da = qa.shape
    ns = kb.shape[1]
    for idx in prange(nb * ns):
        b, s = idx // ns, idx % ns
        for t in range(nt):
            g_s = dz[b, t, s]
            if g_s == 0.0:
                continue
            for a in range(da):
                g = math.tanh(qa[b, t, a] + kb[b, s, a])
                dkb[b, s, a] += g_s * v[a] * (1.0 - g * g)


@njit(cache=True)
def _score(additive, q, hs, qa, kb, v, b, t, s):
    z = 0.0
    if additive:
        for a in range(v.shape[0]):
            z += v[a] * math.tanh(qa[b, t, a] + kb[b, s, a])
    else:
        for i in range(hs.shape[2]):
            z += q[b, t, i] * hs[b, s, i]
    return z


@njit(cache=True, parallel=True)
def _local_fwd(additive, predictive, q, hs, qa, kb, v, keep, pos, lo, hi, radius,
               align, weights, context):
    nb, nt = lo.shape
    ds = hs.shape[2]
    sigma2 = (radius / 2.0) ** 2
    for idx in prange(nb * nt):
        b, t = idx // nt, idx % nt
        s0, s1 = lo[b, t], hi[b, t]
        m = -np.inf
        for s in range(s0, s1):
            if keep[b, t, s]:
                z = _score(additive, q, hs, qa, kb, v, b, t, s)
                align[b, t, s] = z
                if z > m:
                    m = z
        if m == -np.inf:
            continue  # nothing in the window: weights and context stay 0
        total = 0.0
        for s in range(s0, s1):
            if keep[b, t, s]:
                e = math.exp(align[b, t, s] - m)
                align[b, t, s] = e
                total += e
        for s in range(s0, s1):
            if keep[b, t, s]:
                a = align[b, t, s] / total
                align[b, t, s] = a
                w = a
                if predictive:
                    diff = s - pos[b, t]
                    w = a * math.exp(-diff * diff / (2.0 * sigma2))
                weights[b, t, s] = w
                for i in range(ds):
                    context[b, t, i] += w * hs[b, s, i]


@njit(cache=True, parallel=True)
def _local_bwd_q(additive, predictive, q, hs, qa, kb, v, pos, lo, hi, radius, align,
                 dweights, dcontext, dz, dq, dqa, dv_part, dpos):
    """Pass 1 per (batch, step): window softmax VJP -> dz; query-side gradients; dp_t."""
    nb, nt = lo.shape
    ds = hs.shape[2]
    sigma2 = (radius / 2.0) ** 2
    for idx in prange(nb * nt):
        b, t = idx // nt, idx % nt
        s0, s1 = lo[b, t], hi[b, t]
        inner = 0.0
        acc_pos = 0.0
        for s in range(s0, s1):
            a = align[b, t, s]
            if a == 0.0:
                continue
            d = dweights[b, t, s]
            for i in range(ds):
                d += dcontext[b, t, i] * hs[b, s, i]
            if predictive:
                diff = s - pos[b, t]
                g = math.exp(-diff * diff / (2.0 * sigma2))
                acc_pos += d * a * g * diff / sigma2
                d = d * g
            dz[b, t, s] = d
            inner += a * d
        dpos[b, t] = acc_pos
        for s in range(s0, s1):
            a = align[b, t, s]
            if a == 0.0:
                continue
            g_s = a * (dz[b, t, s] - inner)
            dz[b, t, s] = g_s
            if additive:
                for k in range(v.shape[0]):
                    g = math.tanh(qa[b, t, k] + kb[b, s, k])
                    dqa[b, t, k] += g_s * v[k] * (1.0 - g * g)
                    dv_part[b, t, k] += g_s * g
            else:
                for i in range(ds):
                    dq[b, t, i] += g_s * hs[b, s, i]


@njit(cache=True, parallel=True)
def _local_bwd_k(additive, predictive, q, qa, kb, v, pos, lo, hi, radius, align, dz,
                 dcontext, dhs, dkb):
    """Pass 2 per batch element, serial over steps: scatter into the source-side gradients."""
    nb, nt = lo.shape
    ds = dhs.shape[2]
    sigma2 = (radius / 2.0) ** 2
    for b in prange(nb):
        for t in range(nt):
            for s in range(lo[b, t], hi[b, t]):
                a = align[b, t, s]
                if a == 0.0:
                    continue
                w = a
                if predictive:
                    diff = s - pos[b, t]
                    w = a * math.exp(-diff * diff / (2.0 * sigma2))
                g_s = dz[b, t, s]
                for i in range(ds):
                    dhs[b, s, i] += w * dcontext[b, t, i]
                if additive:
                    for k in range(v.shape[0]):
                        g = math.tanh(qa[b, t, k] + kb[b, s, k])
                        dkb[b, s, k] += g_s * v[k] * (1.0 - g * g)
                else:
                    for i in range(ds):
                        dhs[b, s, i] += g_s * q[b, t, i]


# -- Python side ----------------------------------------------------------------------------------


def _supports(call):
    dtype = call.arrays["h_t"].dtype
    if dtype not in (np.float32, np.float64):
        return f"numba kernels take float32 or float64, got {dtype}"
    score = call.static["score"]
    if call.static.get("mode") is None and score not in ("concat", "additive"):
        return (
            f"score={score!r} is a pair of BLAS products; the numba kernel fuses only the "
            "additive 'concat' scores (and Bahdanau), the array_api reference runs this one"
        )
    return None


def _flat(x, shape_tail):
    nb = int(np.prod(x.shape[: x.ndim - len(shape_tail)], dtype=np.int64))
    return np.ascontiguousarray(x.reshape((nb,) + shape_tail))


def _keep(mask, lead, t, s):
    nb = int(np.prod(lead, dtype=np.int64))
    if mask is None:
        return np.ones((nb, t, s), dtype=np.bool_)  # contiguous: one compiled signature
    return np.ascontiguousarray(np.broadcast_to(mask, lead + (t, s)).reshape(nb, t, s))


def _split(score, p, d_t):
    """(w_q, w_k) of the additive score: the halves of the concat weight, or Bahdanau's W_a, U_a."""
    if score == "concat":
        return p["w_a"][:, :d_t], p["w_a"][:, d_t:]
    return p["w_a"], p["u_a"]


def _outer(dy, x):
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _fwd(xp, arrays, static, save):
    h_t, h_s, p, mask = arrays["h_t"], arrays["h_s"], arrays["params"], arrays["mask"]
    dtype = h_t.dtype
    lead, nt, ns = tuple(h_t.shape[:-2]), h_t.shape[-2], h_s.shape[-2]
    d_t, d_s = h_t.shape[-1], h_s.shape[-1]
    ht, hs = _flat(h_t, (nt, d_t)), _flat(h_s, (ns, d_s))
    nb = ht.shape[0]
    keep = _keep(mask, lead, nt, ns)
    score = static["score"]
    additive = score in ("concat", "additive")
    empty = np.zeros((1, 1, 1), dtype)
    q, qa, kb, v = ht, empty, empty, np.zeros(1, dtype)
    if additive:
        w_q, w_k = _split(score, p, d_t)
        qa = ht @ w_q.T
        if "b_a" in p:
            qa = qa + p["b_a"]
        kb, v = hs @ w_k.T, p["v_a"]
        qa, kb = np.ascontiguousarray(qa, dtype), np.ascontiguousarray(kb, dtype)
    elif score == "general":
        q = np.ascontiguousarray(ht @ p["w_a"].T)
    align = np.zeros((nb, nt, ns), dtype)
    saved = {}
    if static.get("mode") is None:
        _additive_fwd(qa, kb, v, keep, align)
        weights = align.copy() if save else align  # the residual must not alias the output
        context = align @ hs
    else:
        radius = static["window"]
        predictive = static["mode"] == "predictive"
        if predictive:
            hidden = np.tanh(ht @ p["w_p"].T)
            sig = 1 / (1 + np.exp(-(hidden @ p["v_p"])))
            scale = ns if static["p_scale"] == "S" else ns - 1
            pos = scale * sig - static["index_base"]
            centre = np.floor(pos) if static["center"] == "floor" else np.floor(pos + 0.5)
            saved.update(hidden=hidden, sig=sig)
        else:
            pos = np.broadcast_to(np.arange(nt, dtype=dtype) + static["offset"], (nb, nt))
            centre = pos
        pos = np.ascontiguousarray(pos, dtype)
        lo = np.clip(centre - radius, 0, ns).astype(np.int64)
        hi = np.clip(centre + radius + 1, 0, ns).astype(np.int64)
        weights = np.zeros((nb, nt, ns), dtype)
        context = np.zeros((nb, nt, d_s), dtype)
        _local_fwd(additive, predictive, q, hs, qa, kb, v, keep, pos, lo, hi, radius,
                   align, weights, context)
        saved.update(pos=pos, lo=lo, hi=hi)
    context = context.astype(dtype, copy=False).reshape(lead + (nt, d_s))
    weights = weights.reshape(lead + (nt, ns))
    if not save:
        return (context, weights), {}
    saved.update(h_t=h_t, h_s=h_s, align=align, q=q if score == "general" else None,
                 qa=qa if additive else None, kb=kb if additive else None)
    saved.update({f"params.{k}": a for k, a in p.items()})
    return (context, weights), saved


def _bwd(xp, saved, static, cotangents):
    h_t, h_s = saved["h_t"], saved["h_s"]
    p = {k[len("params."):]: a for k, a in saved.items() if k.startswith("params.")}
    dtype = h_t.dtype
    lead, nt, ns = tuple(h_t.shape[:-2]), h_t.shape[-2], h_s.shape[-2]
    d_t, d_s = h_t.shape[-1], h_s.shape[-1]
    ht, hs = _flat(h_t, (nt, d_t)), _flat(h_s, (ns, d_s))
    nb = ht.shape[0]
    dc = _flat(np.asarray(cotangents[0], dtype), (nt, d_s))
    dw = _flat(np.asarray(cotangents[1], dtype), (nt, ns))
    align = saved["align"]
    score = static["score"]
    additive = score in ("concat", "additive")
    grads = {}
    if static.get("mode") is None:  # global additive
        qa, kb, v = saved["qa"], saved["kb"], p["v_a"]
        da = dw + dc @ hs.transpose(0, 2, 1)
        dz = np.ascontiguousarray(align * (da - np.sum(align * da, axis=-1, keepdims=True)))
        dqa, dv_part = np.zeros_like(qa), np.zeros_like(qa)
        dkb = np.zeros_like(kb)
        _additive_bwd_q(qa, kb, v, dz, dqa, dv_part)
        _additive_bwd_k(qa, kb, v, dz, dkb)
        dhs = align.transpose(0, 2, 1) @ dc
        dq = None
    else:
        radius = static["window"]
        predictive = static["mode"] == "predictive"
        empty = np.zeros((1, 1, 1), dtype)
        q = saved["q"] if score == "general" else ht
        qa = saved["qa"] if additive else empty
        kb = saved["kb"] if additive else empty
        v = p["v_a"] if additive else np.zeros(1, dtype)
        pos, lo, hi = saved["pos"], saved["lo"], saved["hi"]
        dz = np.zeros((nb, nt, ns), dtype)
        dq = np.zeros((nb, nt, d_s), dtype) if not additive else empty
        dqa, dv_part = (np.zeros_like(qa), np.zeros_like(qa)) if additive else (empty, empty)
        dpos = np.zeros((nb, nt), dtype)
        _local_bwd_q(additive, predictive, q, hs, qa, kb, v, pos, lo, hi, radius, align,
                     dw, dc, dz, dq, dqa, dv_part, dpos)
        dhs = np.zeros((nb, ns, d_s), dtype)
        dkb = np.zeros_like(kb) if additive else empty
        _local_bwd_k(additive, predictive, q, qa, kb, v, pos, lo, hi, radius, align, dz, dc,
                     dhs, dkb)
        if predictive:
            scale = ns if static["p_scale"] == "S" else ns - 1
            sig, hidden = saved["sig"], saved["hidden"]
            dwp = dpos * (scale * sig * (1 - sig))
            grads["v_p"] = np.sum((dwp[..., None] * hidden).reshape(-1, hidden.shape[-1]), axis=0)
            dpre = (dwp[..., None] * p["v_p"]) * (1 - hidden * hidden)
            grads["w_p"] = _outer(dpre, ht)
            dpre_ht = dpre @ p["w_p"]
    if additive:
        w_q, w_k = _split(score, p, d_t)
        dht = dqa @ w_q
        dhs = dhs + dkb @ w_k
        grads["v_a"] = np.sum(dv_part.reshape(-1, dv_part.shape[-1]), axis=0)
        if "b_a" in p:
            grads["b_a"] = np.sum(dqa.reshape(-1, dqa.shape[-1]), axis=0)
        if score == "concat":
            grads["w_a"] = np.concatenate([_outer(dqa, ht), _outer(dkb, hs)], axis=1)
        else:
            grads["w_a"], grads["u_a"] = _outer(dqa, ht), _outer(dkb, hs)
    elif score == "general":
        dht = dq @ p["w_a"]
        grads["w_a"] = _outer(dq, ht)
    else:
        dht = dq
    if static.get("mode") == "predictive":
        dht = dht + dpre_ht
    names = static["names"]
    grads = {k: np.asarray(g, dtype) for k, g in grads.items()}
    return {
        names[0]: np.asarray(dht, dtype).reshape(h_t.shape),
        names[1]: np.asarray(dhs, dtype).reshape(h_s.shape),
        "params": grads if p else None,
    }


_KERNEL = Kernel(_fwd, _bwd, _supports)
KERNELS = {
    "luong_attention": _KERNEL,
    "bahdanau_attention": _KERNEL,
    "local_attention": _KERNEL,
}

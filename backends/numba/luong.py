"""Numba kernels of Luong (concat, local) and Bahdanau attention.

* Additive scores (Luong ``concat``, Bahdanau): the projections ``qa = W h_t + b`` (T×d_a) and
  ``kb = U h_s`` (S×d_a) are BLAS products; the scores ``v · tanh(qa_t + kb_s)`` are a fused loop
  per (batch, target step), so the T×S×d_a tensor never exists. Backward recomputes ``tanh`` once
  per (t, s, a) in one pass over (batch, chunk of target steps) that feeds ``dqa``, ``dv`` and a
  per-chunk ``dkb`` buffer (the buffers are added in a fixed order: deterministic, no races).
* Local attention (local-m / local-p; dot, general or concat scores): scores, softmax, Gaussian
  and context are evaluated only inside each step's window of 2D+1 positions; the dense
  (..., T, S) weights are written because they are the op's output. Backward: pass 1, over
  (batch, step), does the window softmax VJP, ``dp_t`` and the query-side gradients; pass 2, over
  batch and serial over steps, scatters into the source-side gradients.
* The innermost loops run over the contiguous d_a / d_s axis and vectorize (``tanh`` and ``exp2``
  of ``_exp``, no libm calls). Every kernel has a serial twin used for calls below
  ``PARALLEL_MIN_WORK``; such small calls also keep OpenBLAS single-threaded.

Arithmetic runs in the input dtype (float32 or float64); other dtypes are left to ``array_api``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from arrayattn._kernel import Kernel, requirement

from ._blas import blas_threads
from ._exp import LOG2E, exp2, tanh

__all__ = ["KERNELS"]


# -- jitted loops ----------------------------------------------------------------------------------


# Kernels that call the vectorizable ``tanh``/``exp2`` of ``_exp`` use ``error_model="numpy"`` (a
# Python-style zero-division check in ``tanh``'s division would keep the loops scalar) and allow
# reassociation and FMA contraction, so that the d_a loops (innermost, contiguous) vectorize.
_FAST = {"reassoc", "contract"}

#: Calls with fewer tanh evaluations than this (N·T·S·d_a) run the serial twin of a kernel. One
#: vectorized pass does ~4 M tanh per millisecond on one core, while entering a parallel region
#: cost 4–12 ms on the shared 2-core development machine (a trivial ``prange``, OpenMP layer) and
#: tens of microseconds on an idle one; 2**24 (a pass of several ms) keeps that cost bounded.
PARALLEL_MIN_WORK = 1 << 24
#: The additive backward splits each batch element's target steps into chunks (each with a dkb
#: buffer of its own, added in a fixed order afterwards) until there are this many work items; a
#: function of the shapes only, so the result never depends on the thread count.
MIN_BWD_ITEMS = 8


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _additive_fwd_row(qa, kb, v, keep, log2e, ninf, probs, b, t):
    """Scores ``v · tanh(qa_t + kb_s)`` of one (batch, target step) and their softmax over s."""
    ns, da = kb.shape[1], qa.shape[2]
    zero = log2e - log2e
    row = probs[b, t]
    q = qa[b, t]
    m = ninf
    for s in range(ns):
        if keep[b, t, s]:
            k = kb[b, s]
            z = zero
            for a in range(da):
                z += v[a] * tanh(q[a] + k[a])
            row[s] = z
            if z > m:
                m = z
    if m == ninf:
        m = zero  # nothing kept: the row stays 0
    total = zero
    for s in range(ns):
        if keep[b, t, s]:
            e = exp2((row[s] - m) * log2e)
            row[s] = e
            total += e
    if total > zero:
        for s in range(ns):
            row[s] = row[s] / total


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _additive_fwd_par(qa, kb, v, keep, log2e, ninf, probs):
    nt = qa.shape[1]
    for idx in prange(qa.shape[0] * nt):
        _additive_fwd_row(qa, kb, v, keep, log2e, ninf, probs, idx // nt, idx % nt)


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _additive_fwd_ser(qa, kb, v, keep, log2e, ninf, probs):
    nt = qa.shape[1]
    for idx in range(qa.shape[0] * nt):
        _additive_fwd_row(qa, kb, v, keep, log2e, ninf, probs, idx // nt, idx % nt)


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _additive_bwd_item(qa, kb, v, dz, one, nchunks, dqa, dv_part, dkb_part, b, c):
    """Target steps of chunk ``c`` of batch element ``b``: ``g = tanh(qa_t + kb_s)`` once per
    (t, s, a) feeds ``dqa_t``, ``dv_t`` and the chunk's own ``dkb`` buffer."""
    nt, da = qa.shape[1], qa.shape[2]
    ns = kb.shape[1]
    dk = dkb_part[c, b]
    for t in range(c * nt // nchunks, (c + 1) * nt // nchunks):
        q = qa[b, t]
        dq = dqa[b, t]
        dvr = dv_part[b, t]
        for s in range(ns):
            gs = dz[b, t, s]
            if gs == 0:
                continue
            k = kb[b, s]
            dks = dk[s]
            for a in range(da):
                g = tanh(q[a] + k[a])
                h = gs * v[a] * (one - g * g)
                dq[a] += h
                dks[a] += h
                dvr[a] += gs * g


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _additive_bwd_par(qa, kb, v, dz, one, nchunks, dqa, dv_part, dkb_part):
    for w in prange(qa.shape[0] * nchunks):
        _additive_bwd_item(
            qa, kb, v, dz, one, nchunks, dqa, dv_part, dkb_part, w // nchunks, w % nchunks
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _additive_bwd_ser(qa, kb, v, dz, one, nchunks, dqa, dv_part, dkb_part):
    for w in range(qa.shape[0] * nchunks):
        _additive_bwd_item(
            qa, kb, v, dz, one, nchunks, dqa, dv_part, dkb_part, w // nchunks, w % nchunks
        )


def _additive_forward(qa, kb, v, keep, probs, parallel):
    cdt = qa.dtype.type
    kernel = _additive_fwd_par if parallel else _additive_fwd_ser
    kernel(qa, kb, v, keep, cdt(LOG2E), cdt(-np.inf), probs)


def _additive_backward(qa, kb, v, dz, parallel):
    """(dqa, dv_part, dkb) of the additive scores given dz = dL/dscores."""
    nb, nt = qa.shape[0], qa.shape[1]
    cdt = qa.dtype.type
    nchunks = max(1, min(nt, -(-MIN_BWD_ITEMS // max(nb, 1))))
    dqa, dv_part = np.zeros_like(qa), np.zeros_like(qa)
    dkb_part = np.zeros((nchunks,) + kb.shape, dtype=kb.dtype)
    kernel = _additive_bwd_par if parallel else _additive_bwd_ser
    kernel(qa, kb, v, dz, cdt(1), nchunks, dqa, dv_part, dkb_part)
    dkb = dkb_part[0] if nchunks == 1 else np.sum(dkb_part, axis=0)
    return dqa, dv_part, dkb


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _score(additive, q, hs, qa, kb, v, zero, b, t, s):
    z = zero
    if additive:
        qr, kr = qa[b, t], kb[b, s]
        for a in range(v.shape[0]):
            z += v[a] * tanh(qr[a] + kr[a])
    else:
        qr, hr = q[b, t], hs[b, s]
        for i in range(hr.shape[0]):
            z += qr[i] * hr[i]
    return z


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _local_fwd_row(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    keep,
    pos,
    lo,
    hi,
    radius,
    log2e,
    ninf,
    align,
    weights,
    context,
    b,
    t,
):
    ds = hs.shape[2]
    zero = log2e - log2e
    sigma2 = (radius / 2.0) ** 2
    s0, s1 = lo[b, t], hi[b, t]
    ar = align[b, t]
    m = ninf
    for s in range(s0, s1):
        if keep[b, t, s]:
            z = _score(additive, q, hs, qa, kb, v, zero, b, t, s)
            ar[s] = z
            if z > m:
                m = z
    if m != ninf:  # else nothing in the window: weights and context stay 0
        total = zero
        for s in range(s0, s1):
            if keep[b, t, s]:
                e = exp2((ar[s] - m) * log2e)
                ar[s] = e
                total += e
        wr, ctx = weights[b, t], context[b, t]
        for s in range(s0, s1):
            if keep[b, t, s]:
                a = ar[s] / total
                ar[s] = a
                wr[s] = a
                if predictive:
                    diff = s - pos[b, t]
                    wr[s] = a * math.exp(-diff * diff / (2.0 * sigma2))
                w = wr[s]  # in the array dtype
                hr = hs[b, s]
                for i in range(ds):
                    ctx[i] += w * hr[i]


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _local_fwd_par(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    keep,
    pos,
    lo,
    hi,
    radius,
    log2e,
    ninf,
    align,
    weights,
    context,
):
    nt = lo.shape[1]
    for idx in prange(lo.shape[0] * nt):
        _local_fwd_row(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            keep,
            pos,
            lo,
            hi,
            radius,
            log2e,
            ninf,
            align,
            weights,
            context,
            idx // nt,
            idx % nt,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _local_fwd_ser(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    keep,
    pos,
    lo,
    hi,
    radius,
    log2e,
    ninf,
    align,
    weights,
    context,
):
    nt = lo.shape[1]
    for idx in range(lo.shape[0] * nt):
        _local_fwd_row(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            keep,
            pos,
            lo,
            hi,
            radius,
            log2e,
            ninf,
            align,
            weights,
            context,
            idx // nt,
            idx % nt,
        )


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_q_row(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    pos,
    lo,
    hi,
    radius,
    one,
    align,
    dweights,
    dcontext,
    dz,
    dq,
    dqa,
    dv_part,
    dpos,
    b,
    t,
):
    """Window softmax VJP -> dz; query-side gradients; dp_t, for one (batch, step)."""
    ds = hs.shape[2]
    zero = one - one
    sigma2 = (radius / 2.0) ** 2
    s0, s1 = lo[b, t], hi[b, t]
    ar, dzr, dwr, dcr = align[b, t], dz[b, t], dweights[b, t], dcontext[b, t]
    inner = zero
    acc_pos = 0.0
    for s in range(s0, s1):
        a = ar[s]
        if a == zero:
            continue
        d = dwr[s]
        hr = hs[b, s]
        for i in range(ds):
            d += dcr[i] * hr[i]
        dzr[s] = d
        if predictive:
            diff = s - pos[b, t]
            g = math.exp(-diff * diff / (2.0 * sigma2))
            acc_pos += d * a * g * diff / sigma2
            dzr[s] = d * g
        inner += a * dzr[s]
    dpos[b, t] = acc_pos
    for s in range(s0, s1):
        a = ar[s]
        if a == zero:
            continue
        g_s = a * (dzr[s] - inner)
        dzr[s] = g_s
        if additive:
            qr, kr, dqr, dvr = qa[b, t], kb[b, s], dqa[b, t], dv_part[b, t]
            for k in range(v.shape[0]):
                g = tanh(qr[k] + kr[k])
                dqr[k] += g_s * v[k] * (one - g * g)
                dvr[k] += g_s * g
        else:
            hr, dqr = hs[b, s], dq[b, t]
            for i in range(ds):
                dqr[i] += g_s * hr[i]


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_q_par(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    pos,
    lo,
    hi,
    radius,
    one,
    align,
    dweights,
    dcontext,
    dz,
    dq,
    dqa,
    dv_part,
    dpos,
):
    nt = lo.shape[1]
    for idx in prange(lo.shape[0] * nt):
        _local_bwd_q_row(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            pos,
            lo,
            hi,
            radius,
            one,
            align,
            dweights,
            dcontext,
            dz,
            dq,
            dqa,
            dv_part,
            dpos,
            idx // nt,
            idx % nt,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_q_ser(
    additive,
    predictive,
    q,
    hs,
    qa,
    kb,
    v,
    pos,
    lo,
    hi,
    radius,
    one,
    align,
    dweights,
    dcontext,
    dz,
    dq,
    dqa,
    dv_part,
    dpos,
):
    nt = lo.shape[1]
    for idx in range(lo.shape[0] * nt):
        _local_bwd_q_row(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            pos,
            lo,
            hi,
            radius,
            one,
            align,
            dweights,
            dcontext,
            dz,
            dq,
            dqa,
            dv_part,
            dpos,
            idx // nt,
            idx % nt,
        )


@njit(inline="always", cache=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_k_item(
    additive, predictive, q, qa, kb, v, pos, lo, hi, radius, one, align, dz, dcontext, dhs, dkb, b
):
    """Batch element ``b``, serial over steps: scatter into the source-side gradients."""
    nt = lo.shape[1]
    ds = dhs.shape[2]
    zero = one - one
    sigma2 = (radius / 2.0) ** 2
    wbuf = np.empty(1, dhs.dtype)
    for t in range(nt):
        ar, dzr, dcr = align[b, t], dz[b, t], dcontext[b, t]
        for s in range(lo[b, t], hi[b, t]):
            a = ar[s]
            if a == zero:
                continue
            wbuf[0] = a
            if predictive:
                diff = s - pos[b, t]
                wbuf[0] = a * math.exp(-diff * diff / (2.0 * sigma2))
            w = wbuf[0]  # in the array dtype
            g_s = dzr[s]
            dhr = dhs[b, s]
            for i in range(ds):
                dhr[i] += w * dcr[i]
            if additive:
                qr, kr, dkr = qa[b, t], kb[b, s], dkb[b, s]
                for k in range(v.shape[0]):
                    g = tanh(qr[k] + kr[k])
                    dkr[k] += g_s * v[k] * (one - g * g)
            else:
                qr = q[b, t]
                for i in range(ds):
                    dhr[i] += g_s * qr[i]


@njit(cache=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_k_par(
    additive, predictive, q, qa, kb, v, pos, lo, hi, radius, one, align, dz, dcontext, dhs, dkb
):
    for b in prange(lo.shape[0]):
        _local_bwd_k_item(
            additive,
            predictive,
            q,
            qa,
            kb,
            v,
            pos,
            lo,
            hi,
            radius,
            one,
            align,
            dz,
            dcontext,
            dhs,
            dkb,
            b,
        )


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _local_bwd_k_ser(
    additive, predictive, q, qa, kb, v, pos, lo, hi, radius, one, align, dz, dcontext, dhs, dkb
):
    for b in range(lo.shape[0]):
        _local_bwd_k_item(
            additive,
            predictive,
            q,
            qa,
            kb,
            v,
            pos,
            lo,
            hi,
            radius,
            one,
            align,
            dz,
            dcontext,
            dhs,
            dkb,
            b,
        )


def _parallel(options, h_t, h_s, p):
    """Whether a call is large enough for the parallel kernels (and multi-threaded BLAS): its
    score-loop length N·T·S·(d_a or d_s), S capped at the window 2D+1 for local attention."""
    nb = math.prod(h_t.shape[:-2])
    nt, ns = h_t.shape[-2], h_s.shape[-2]
    width = p["v_a"].shape[0] if options.score in ("concat", "additive") else h_s.shape[-1]
    if options.mode is not None:
        ns = min(ns, 2 * options.window + 1)
    return nb * nt * ns * width >= PARALLEL_MIN_WORK


# -- Python side ----------------------------------------------------------------------------------


@requirement("additive scores ('concat', Bahdanau) or local attention")
def _fused_scores(call):
    score = call.options.score
    if call.options.mode is None and score not in ("concat", "additive"):
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


def _rows(x):
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: a zero width is allowed


def _outer(dy, x):
    return _rows(dy).T @ _rows(x)


#: Residuals saved with their leading dims unflattened (the kernels run on flat (B, ...) views).
_FLAT = ("align", "q", "qa", "kb", "pos", "hidden", "sig")


def _window(pos, predictive, center, radius, ns):
    """The [lo, hi) key window of each query around its centre (the forward's and backward's)."""
    centre = pos
    if predictive:
        centre = np.floor(pos) if center == "floor" else np.floor(pos + 0.5)
    return (
        np.clip(centre - radius, 0, ns).astype(np.int64),
        np.clip(centre + radius + 1, 0, ns).astype(np.int64),
    )


def _fwd(xp, arrays, options, save):
    parallel = _parallel(options, arrays["h_t"], arrays["h_s"], arrays["params"] or {})
    with blas_threads(parallel):
        return _fwd_body(arrays, options, save, parallel)


def _fwd_body(arrays, options, save, parallel):
    h_t, h_s, p, mask = arrays["h_t"], arrays["h_s"], arrays["params"], arrays["mask"]
    dtype = h_t.dtype
    lead, nt, ns = tuple(h_t.shape[:-2]), h_t.shape[-2], h_s.shape[-2]
    d_t, d_s = h_t.shape[-1], h_s.shape[-1]
    ht, hs = _flat(h_t, (nt, d_t)), _flat(h_s, (ns, d_s))
    nb = ht.shape[0]
    keep = _keep(mask, lead, nt, ns)
    score = options.score
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
    if options.mode is None:
        _additive_forward(qa, kb, v, keep, align, parallel)
        weights = align.copy() if save else align  # the residual must not alias the output
        context = align @ hs
    else:
        radius = options.window
        predictive = options.mode == "predictive"
        if predictive:
            hidden = np.tanh(ht @ p["w_p"].T)
            sig = 1 / (1 + np.exp(-(hidden @ p["v_p"])))
            scale = ns if options.p_scale == "S" else ns - 1
            pos = scale * sig - options.index_base
            saved.update(hidden=hidden, sig=sig)
        else:
            pos = np.broadcast_to(np.arange(nt, dtype=dtype) + options.offset, (nb, nt))
        pos = np.ascontiguousarray(pos, dtype)
        lo, hi = _window(pos, predictive, options.center, radius, ns)
        weights = np.zeros((nb, nt, ns), dtype)
        context = np.zeros((nb, nt, d_s), dtype)
        kernel = _local_fwd_par if parallel else _local_fwd_ser
        kernel(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            keep,
            pos,
            lo,
            hi,
            radius,
            dtype.type(LOG2E),
            dtype.type(-np.inf),
            align,
            weights,
            context,
        )
        saved.update(pos=pos)
    context = context.astype(dtype, copy=False).reshape(lead + (nt, d_s))
    weights = weights.reshape(lead + (nt, ns))
    if not save:
        return (context, weights), {}
    # The residual record of every backend (arrayattn._glue.luong): unflattened leading dims.
    saved["align"] = align
    if score == "general":
        saved["q"] = q
    if additive:
        saved.update(qa=qa, kb=kb)
    record = {key: a.reshape(lead + a.shape[1:]) for key, a in saved.items()}
    record.update(h_t=h_t, h_s=h_s, **{f"params.{k}": a for k, a in p.items()})
    return (context, weights), record


def _bwd(xp, saved, options, cotangents):
    p = {k[len("params.") :]: a for k, a in saved.items() if k.startswith("params.")}
    parallel = _parallel(options, saved["h_t"], saved["h_s"], p)
    with blas_threads(parallel):
        return _bwd_body(saved, options, cotangents, parallel)


def _bwd_body(saved, options, cotangents, parallel):
    h_t, h_s = saved["h_t"], saved["h_s"]
    p = {k[len("params.") :]: a for k, a in saved.items() if k.startswith("params.")}
    dtype = h_t.dtype
    nt, ns = h_t.shape[-2], h_s.shape[-2]
    d_t, d_s = h_t.shape[-1], h_s.shape[-1]
    ht, hs = _flat(h_t, (nt, d_t)), _flat(h_s, (ns, d_s))
    nb = ht.shape[0]
    dc = _flat(np.asarray(cotangents[0], dtype), (nt, d_s))
    dw = _flat(np.asarray(cotangents[1], dtype), (nt, ns))
    saved = {
        k: (_flat(a, a.shape[len(h_t.shape) - 2 :]) if k in _FLAT else a) for k, a in saved.items()
    }
    align = saved["align"]
    score = options.score
    additive = score in ("concat", "additive")
    grads = {}
    if options.mode is None:  # global additive
        qa, kb, v = saved["qa"], saved["kb"], p["v_a"]
        da = dw + dc @ hs.transpose(0, 2, 1)
        dz = np.ascontiguousarray(align * (da - np.sum(align * da, axis=-1, keepdims=True)))
        dqa, dv_part, dkb = _additive_backward(qa, kb, v, dz, parallel)
        dhs = align.transpose(0, 2, 1) @ dc
        dq = None
    else:
        radius = options.window
        predictive = options.mode == "predictive"
        empty = np.zeros((1, 1, 1), dtype)
        q = saved["q"] if score == "general" else ht
        qa = saved["qa"] if additive else empty
        kb = saved["kb"] if additive else empty
        v = p["v_a"] if additive else np.zeros(1, dtype)
        pos = saved["pos"]
        lo, hi = _window(pos, predictive, options.center, radius, ns)
        dz = np.zeros((nb, nt, ns), dtype)
        dq = np.zeros((nb, nt, d_s), dtype) if not additive else empty
        dqa, dv_part = (np.zeros_like(qa), np.zeros_like(qa)) if additive else (empty, empty)
        dpos = np.zeros((nb, nt), dtype)
        one = dtype.type(1)
        kernel = _local_bwd_q_par if parallel else _local_bwd_q_ser
        kernel(
            additive,
            predictive,
            q,
            hs,
            qa,
            kb,
            v,
            pos,
            lo,
            hi,
            radius,
            one,
            align,
            dw,
            dc,
            dz,
            dq,
            dqa,
            dv_part,
            dpos,
        )
        dhs = np.zeros((nb, ns, d_s), dtype)
        dkb = np.zeros_like(kb) if additive else empty
        kernel = _local_bwd_k_par if parallel else _local_bwd_k_ser
        kernel(
            additive, predictive, q, qa, kb, v, pos, lo, hi, radius, one, align, dz, dc, dhs, dkb
        )
        if predictive:
            scale = ns if options.p_scale == "S" else ns - 1
            sig, hidden = saved["sig"], saved["hidden"]
            dwp = dpos * (scale * sig * (1 - sig))
            grads["v_p"] = np.sum(_rows(dwp[..., None] * hidden), axis=0)
            dpre = (dwp[..., None] * p["v_p"]) * (1 - hidden * hidden)
            grads["w_p"] = _outer(dpre, ht)
            dpre_ht = dpre @ p["w_p"]
    if additive:
        w_q, w_k = _split(score, p, d_t)
        dht = dqa @ w_q
        dhs = dhs + dkb @ w_k
        grads["v_a"] = np.sum(_rows(dv_part), axis=0)
        if "b_a" in p:
            grads["b_a"] = np.sum(_rows(dqa), axis=0)
        if score == "concat":
            grads["w_a"] = np.concatenate([_outer(dqa, ht), _outer(dkb, hs)], axis=1)
        else:
            grads["w_a"], grads["u_a"] = _outer(dqa, ht), _outer(dkb, hs)
    elif score == "general":
        dht = dq @ p["w_a"]
        grads["w_a"] = _outer(dq, ht)
    else:
        dht = dq
    if options.mode == "predictive":
        dht = dht + dpre_ht
    names = options.names
    grads = {k: np.asarray(g, dtype) for k, g in grads.items()}
    return {
        names[0]: np.asarray(dht, dtype).reshape(h_t.shape),
        names[1]: np.asarray(dhs, dtype).reshape(h_s.shape),
        "params": grads if p else None,
    }


_KERNEL = Kernel(_fwd, _bwd, requires=(_fused_scores,))
KERNELS = {
    "luong_attention": _KERNEL,
    "bahdanau_attention": _KERNEL,
    "local_attention": _KERNEL,
}

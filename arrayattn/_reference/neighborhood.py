"""Array-API reference of windowed local attention: neighbourhood attention (NA/SASA) and HaloNet.

Every local mechanism here is one *separable window attention*: along each spatial axis a query at
position ``i`` has ``K`` window slots, and slot ``w`` names a key position ``idx[w, i]``, whether
that
key lies in the image (``valid[w, i]``) and the row of the relative tables it reads
(``rel[w, i]``). A 2-D window is the product of the two axes' slots. The tables are tiny
(``K × L`` integers per axis) and are built with NumPy by :func:`na_axis_windows` (NATTEN clamp,
SASA zero padding, masked, causal) and :func:`halo_axis_windows` (HaloNet blocks).

Logit of query ``p = (i, j)`` and slot ``(wy, wx)`` with key ``n``::

    s = scale·q_p·k_n + q_p·r_h[rel_y] + q_p·r_w[rel_x] + bias[..., rel_y, rel_x]

Out-of-image slots (``valid`` false) are zero vectors that take part in the softmax (``'zero'``:
``k_n = v_n = 0`` but the relative terms remain) or are excluded (``'mask'``: ``s = -inf``).

The forward gathers keys and values plane by plane with ``xp.take`` (one slot at a time: no
``K²``-times copy of the keys is ever held), keeping the ``(..., H, W, K²)`` logits. The backward
(docs/derivations/neighborhood.rst) recomputes the probabilities from the saved logsumexp and
scatter-adds ``dk``, ``dv`` through one-hot matrices of the index maps (``Oᵀ @ c`` is the adjoint
of the gather ``O @ k``), so it is deterministic and needs no in-place writes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._xp import Array, compute_dtype, device_of, sum_to_shape

__all__ = [
    "AxisWindows",
    "halo_axis_windows",
    "inverse_windows",
    "na_axis_windows",
    "window_attention_backward",
    "window_attention_forward",
]


class AxisWindows(NamedTuple):
    """The window of every query along one axis: ``(K, L)`` NumPy tables and the table size."""

    idx: np.ndarray  # int64 (K, L): key position of slot w for query i (0 where not valid)
    valid: np.ndarray  # bool (K, L): the key lies inside the image
    rel: np.ndarray  # int64 (K, L): row of the relative tables read by the slot
    table: int  # number of rows of the relative tables along this axis


def na_axis_windows(
    length: int, kernel: int, dilation: int, boundary: str, causal: bool = False
) -> AxisWindows:
    """Neighbourhood windows along one axis (relative row ``(key - query)/dilation + K - 1``).

    ``boundary='clamp'`` is NATTEN's rule: positions are partitioned by ``i mod dilation`` into
    sub-sequences of length ``n = ceil((L - i mod dil)/dil)``; within its sub-sequence the query at
    sub-index ``s`` sees sub-indices ``clamp(s - K//2, 0, n - K) + 0..K-1`` (even ``K``: ``K//2``
    keys before the query and ``K//2 - 1`` after, NATTEN >= 0.17.5). ``'zero'`` and ``'mask'`` use
    the centred window ``i + (w - K//2)·dil`` and flag the keys outside ``[0, L)``. ``causal`` keys
    are ``i - (K-1-w)·dil`` (NATTEN's causal window: it is not shifted, keys before 0 are
    outside); with ``'clamp'`` they are excluded as in ``'mask'``.
    """
    i = np.arange(length)[None, :]
    w = np.arange(kernel)[:, None]
    if causal:
        key = i - (kernel - 1 - w) * dilation
    elif boundary == "clamp":
        rho, s = i % dilation, i // dilation
        n = (length - rho + dilation - 1) // dilation
        start = np.clip(s - kernel // 2, 0, n - kernel)
        key = (start + w) * dilation + rho
    else:
        key = i + (w - kernel // 2) * dilation
    key = np.broadcast_to(key, (kernel, length))
    valid = (key >= 0) & (key < length)
    rel = (key - i) // dilation + kernel - 1
    return AxisWindows(
        np.where(valid, key, 0).astype(np.int64), valid, rel.astype(np.int64), 2 * kernel - 1
    )


def halo_axis_windows(length: int, block: int, halo: int, table: int) -> AxisWindows:
    """HaloNet windows along one axis: block ``i // b`` sees rows ``I·b - h .. I·b + b + h - 1``.

    The relative row is ``key - query + b + h - 1`` for a compact table of ``2(b+h) - 1`` rows,
    or ``key - query + b + 3h - 1`` for timm's table of ``2(b+2h) - 1`` rows (whose first ``2h``
    rows are never read).
    """
    win = block + 2 * halo
    i = np.arange(length)[None, :]
    w = np.arange(win)[:, None]
    key = np.broadcast_to((i // block) * block - halo + w, (win, length))
    valid = (key >= 0) & (key < length)
    origin = block + halo - 1 if table == 2 * (block + halo) - 1 else block + 3 * halo - 1
    rel = key - i + origin
    return AxisWindows(np.where(valid, key, 0).astype(np.int64), valid, rel.astype(np.int64), table)


def inverse_windows(win: AxisWindows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR form of the inverse neighbourhood: for key j, the (query, slot) pairs that read it.

    Returns ``(ptr, query, slot)``: the pairs of key ``j`` are ``ptr[j]:ptr[j+1]``, ordered by
    query then slot (a fixed order, so scatter-adds done per key are deterministic).
    """
    kernel, length = win.idx.shape
    w, i = np.nonzero(win.valid)
    keys = win.idx[w, i]
    order = np.lexsort((w, i, keys))
    counts = np.bincount(keys, minlength=length)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ptr, i[order].astype(np.int64), w[order].astype(np.int64)


# -- helpers ---------------------------------------------------------------------------------------


class _Tables:
    """The per-axis tables as arrays of ``xp`` on the inputs' device."""

    def __init__(self, xp: Any, win: AxisWindows, cdt: Any, device: Any):
        k, length = win.idx.shape
        self.k = k
        self.idx = [
            xp.asarray(win.idx[w].tolist(), dtype=xp.int64, device=device) for w in range(k)
        ]
        self.rel = [
            xp.asarray(win.rel[w].tolist(), dtype=xp.int64, device=device) for w in range(k)
        ]
        self.all_valid = bool(win.valid.all())
        self.valid = [
            xp.asarray(win.valid[w].tolist(), dtype=xp.bool, device=device) for w in range(k)
        ]
        self.validf = [xp.astype(m, cdt) for m in self.valid]
        self._xp, self._cdt, self._length, self._table = xp, cdt, length, win.table
        self._positions = xp.arange(length, dtype=xp.int64, device=device)
        self._rows = xp.arange(win.table, dtype=xp.int64, device=device)

    def scatter(self, w: int) -> Array:
        """(L, L) float one-hot of slot w transposed: ``S[j, i] = 1`` iff query i reads key j."""
        xp = self._xp
        hit = (self.idx[w][None, :] == self._positions[:, None]) & self.valid[w][None, :]
        return xp.astype(hit, self._cdt)

    def rel_onehot(self, w: int) -> Array:
        """(T, L) float one-hot: ``R[t, i] = 1`` iff query i reads table row t in slot w."""
        xp = self._xp
        return xp.astype(self.rel[w][None, :] == self._rows[:, None], self._cdt)


def _as(xp, a, cdt):
    return None if a is None else xp.astype(a, cdt, copy=False)


def _slot_logit(xp, qc, kg, ty, tx, wy, wx, zero_mode, scale, rh_rows, rw_rows, bias):
    """Logits of slot (wy, wx) for every query: shape (..., H, W)."""
    s = xp.sum(qc * kg, axis=-1) * scale
    valid = None
    if not (ty.all_valid and tx.all_valid):
        valid = ty.valid[wy][:, None] & tx.valid[wx][None, :]
        if zero_mode:  # a padded key is the zero vector: its scale·q·k term is 0
            s = xp.where(valid, s, xp.zeros_like(s))
    if rh_rows is not None:
        s = s + rh_rows[wy]
    if rw_rows is not None:
        s = s + rw_rows[wx]
    if bias is not None:
        b = xp.take(xp.take(bias, ty.rel[wy], axis=-2), tx.rel[wx], axis=-1)
        s = s + b
    if valid is not None and not zero_mode:
        s = xp.where(valid, s, xp.full_like(s, -xp.inf))
    return s


def _rel_terms(xp, qc, ty, tx, r_h, r_w):
    """``q·r_h[rel_y]`` per y-slot (..., H, 1) -> list, and ``q·r_w[rel_x]`` per x-slot."""
    rh_rows = rw_rows = None
    if r_h is not None:
        rh_rows = []
        for wy in range(ty.k):
            rows = xp.take(r_h, ty.rel[wy], axis=-2)  # (..., H, d)
            rh_rows.append(xp.sum(qc * xp.expand_dims(rows, axis=-2), axis=-1))
    if r_w is not None:
        rw_rows = []
        for wx in range(tx.k):
            rows = xp.take(r_w, tx.rel[wx], axis=-2)  # (..., W, d)
            rw_rows.append(xp.sum(qc * xp.expand_dims(rows, axis=-3), axis=-1))
    return rh_rows, rw_rows


def _logits(xp, qc, kc, ty, tx, zero_mode, scale, bias, r_h, r_w):
    rh_rows, rw_rows = _rel_terms(xp, qc, ty, tx, r_h, r_w)
    planes = []
    for wy in range(ty.k):
        k_row = xp.take(kc, ty.idx[wy], axis=-3)
        for wx in range(tx.k):
            kg = xp.take(k_row, tx.idx[wx], axis=-2)
            planes.append(
                _slot_logit(xp, qc, kg, ty, tx, wy, wx, zero_mode, scale, rh_rows, rw_rows, bias)
            )
    return xp.stack(planes, axis=-1)


def _probabilities(xp, s):
    """Row softmax of the (..., S) logits and its logsumexp; an empty row gives p = 0, +inf."""
    m = xp.max(s, axis=-1, keepdims=True)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, xp.zeros_like(m))
    e = xp.exp(s - m0)
    total = xp.sum(e, axis=-1, keepdims=True)
    safe = xp.where(finite, total, xp.ones_like(total))
    p = xp.where(finite, e / safe, xp.zeros_like(e))
    lse = xp.where(finite, m0 + xp.log(safe), xp.full_like(m, xp.inf))
    return p, lse[..., 0]


def window_attention_forward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    wy: AxisWindows,
    wx: AxisWindows,
    *,
    boundary: str,
    scale: float,
    rel_bias: Array | None = None,
    r_h: Array | None = None,
    r_w: Array | None = None,
) -> tuple[Array, Array]:
    """Forward of separable window attention on (..., H, W, ·) arrays: ``(out, lse)``.

    ``boundary`` is ``'zero'`` (out-of-image slots are zero keys and values that stay in the
    softmax) or anything else (they are excluded). ``lse`` is in the compute dtype.
    """
    cdt = compute_dtype(xp, q.dtype)
    dev = device_of(q)
    ty, tx = _Tables(xp, wy, cdt, dev), _Tables(xp, wx, cdt, dev)
    qc, kc, vc = _as(xp, q, cdt), _as(xp, k, cdt), _as(xp, v, cdt)
    bias, rh, rw = _as(xp, rel_bias, cdt), _as(xp, r_h, cdt), _as(xp, r_w, cdt)
    zero_mode = boundary == "zero"
    s = _logits(xp, qc, kc, ty, tx, zero_mode, scale, bias, rh, rw)
    p, lse = _probabilities(xp, s)
    out = None
    slot = 0
    for a in range(ty.k):
        v_row = xp.take(vc, ty.idx[a], axis=-3)
        for b in range(tx.k):
            vg = xp.take(v_row, tx.idx[b], axis=-2)
            if zero_mode and not (ty.all_valid and tx.all_valid):
                vg = vg * xp.expand_dims(ty.validf[a][:, None] * tx.validf[b][None, :], axis=-1)
            term = xp.expand_dims(p[..., slot], axis=-1) * vg
            out = term if out is None else out + term
            slot += 1
    return xp.astype(out, q.dtype), lse


def _scatter_rows(xp, s_t, c):
    """``Σ_i S[j, i] c[..., i, w, :]`` along axis -3 of c (..., H, W, d)."""
    shape = tuple(c.shape)
    flat = xp.reshape(c, shape[:-2] + (shape[-2] * shape[-1],))
    return xp.reshape(xp.matmul(s_t, flat), shape)


def window_attention_backward(
    xp: Any,
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    wy: AxisWindows,
    wx: AxisWindows,
    *,
    boundary: str,
    scale: float,
    rel_bias: Array | None = None,
    r_h: Array | None = None,
    r_w: Array | None = None,
) -> tuple[Array, Array, Array, Array | None, Array | None, Array | None]:
    """Gradients ``(dq, dk, dv, drel_bias, dr_h, dr_w)`` of :func:`window_attention_forward`."""
    cdt = compute_dtype(xp, q.dtype)
    dev = device_of(q)
    ty, tx = _Tables(xp, wy, cdt, dev), _Tables(xp, wx, cdt, dev)
    qc, kc, vc = _as(xp, q, cdt), _as(xp, k, cdt), _as(xp, v, cdt)
    bias, rh, rw = _as(xp, rel_bias, cdt), _as(xp, r_h, cdt), _as(xp, r_w, cdt)
    do, oc = _as(xp, dout, cdt), _as(xp, out, cdt)
    zero_mode = boundary == "zero"
    masked_slots = zero_mode and not (ty.all_valid and tx.all_valid)
    s = _logits(xp, qc, kc, ty, tx, zero_mode, scale, bias, rh, rw)
    lse_c = xp.expand_dims(xp.astype(lse, cdt), axis=-1)
    finite = xp.isfinite(lse_c)
    p = xp.where(
        finite, xp.exp(s - xp.where(finite, lse_c, xp.zeros_like(lse_c))), xp.zeros_like(s)
    )
    big_d = xp.sum(do * oc, axis=-1)  # (..., H, W)

    dq = xp.zeros_like(qc)
    dk = xp.zeros_like(kc)
    dv = xp.zeros_like(vc)
    dl_planes = []
    slot = 0
    for a in range(ty.k):
        k_row = xp.take(kc, ty.idx[a], axis=-3)
        v_row = xp.take(vc, ty.idx[a], axis=-3)
        dk_x = None
        dv_x = None
        for b in range(tx.k):
            kg = xp.take(k_row, tx.idx[b], axis=-2)
            vg = xp.take(v_row, tx.idx[b], axis=-2)
            if masked_slots:
                keep = xp.expand_dims(ty.validf[a][:, None] * tx.validf[b][None, :], axis=-1)
                kg, vg = kg * keep, vg * keep
            pw = p[..., slot]
            dl = pw * (xp.sum(do * vg, axis=-1) - big_d)
            dl_planes.append(dl)
            dl_e = xp.expand_dims(dl, axis=-1)
            dq = dq + dl_e * kg * scale
            sx = tx.scatter(b)
            ck = xp.matmul(sx, dl_e * qc)
            cv = xp.matmul(sx, xp.expand_dims(pw, axis=-1) * do)
            dk_x = ck if dk_x is None else dk_x + ck
            dv_x = cv if dv_x is None else dv_x + cv
            slot += 1
        sy = ty.scatter(a)
        dk = dk + _scatter_rows(xp, sy, dk_x) * scale
        dv = dv + _scatter_rows(xp, sy, dv_x)

    def plane(a, b):
        return dl_planes[a * tx.k + b]

    drh = drw = dbias = None
    if rh is not None:
        acc = None
        for a in range(ty.k):
            dl_a = plane(a, 0)
            for b in range(1, tx.k):
                dl_a = dl_a + plane(a, b)
            rows = xp.take(rh, ty.rel[a], axis=-2)  # (..., H, d)
            dq = dq + xp.expand_dims(dl_a, axis=-1) * xp.expand_dims(rows, axis=-2)
            t = xp.sum(xp.expand_dims(dl_a, axis=-1) * qc, axis=-2)  # (..., H, d)
            term = xp.matmul(ty.rel_onehot(a), t)  # (..., T, d)
            acc = term if acc is None else acc + term
        assert r_h is not None
        drh = xp.astype(sum_to_shape(xp, acc, r_h.shape), r_h.dtype)
    if rw is not None:
        acc = None
        for b in range(tx.k):
            dl_b = plane(0, b)
            for a in range(1, ty.k):
                dl_b = dl_b + plane(a, b)
            rows = xp.take(rw, tx.rel[b], axis=-2)  # (..., W, d)
            dq = dq + xp.expand_dims(dl_b, axis=-1) * xp.expand_dims(rows, axis=-3)
            t = xp.sum(xp.expand_dims(dl_b, axis=-1) * qc, axis=-3)  # (..., W, d)
            term = xp.matmul(tx.rel_onehot(b), t)
            acc = term if acc is None else acc + term
        assert r_w is not None
        drw = xp.astype(sum_to_shape(xp, acc, r_w.shape), r_w.dtype)
    if bias is not None:
        acc = None
        for a in range(ty.k):
            row = None
            for b in range(tx.k):
                term = xp.matmul(plane(a, b), xp.matrix_transpose(tx.rel_onehot(b)))  # (..., H, Tx)
                row = term if row is None else row + term
            term = xp.matmul(ty.rel_onehot(a), row)  # (..., Ty, Tx)
            acc = term if acc is None else acc + term
        assert rel_bias is not None
        dbias = xp.astype(sum_to_shape(xp, acc, rel_bias.shape), rel_bias.dtype)
    return (xp.astype(dq, q.dtype), xp.astype(dk, k.dtype), xp.astype(dv, v.dtype), dbias, drh, drw)

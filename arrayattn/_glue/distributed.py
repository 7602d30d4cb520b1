"""Glue of the sequence-parallel ops of :mod:`arrayattn.distributed`: the communicator as an
option, agreement across ranks, the transport, the ring plan, and the reference kernels.

Both kernels are composite: the local blocks run through the ``scaled_dot_product_attention`` op
(received as ``ops``), on whichever backend the setting picks for it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .._kernel import Kernel, Options, Residuals
from .._reference.merge import merge_forward
from .._xp import Array, compute_dtype

# Point-to-point tags: key/value blocks travelling forward, dK/dV accumulators in backward.
_TAG_KV = 0x6172


_TAG_DKV = 0x6174


class _Comm:
    """An mpi4py communicator as a hashable option (mpi4py's are unhashable)."""

    __slots__ = ("comm", "rank", "size")

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def __hash__(self) -> int:
        return id(self.comm)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Comm) and other.comm is self.comm

    def __repr__(self) -> str:
        return f"<communicator: rank {self.rank} of {self.size}>"


def _check_comm(comm: Any) -> _Comm:
    try:
        from mpi4py import MPI
    except ImportError:  # then comm cannot be an mpi4py communicator either
        raise TypeError(
            f"comm: expected an mpi4py communicator, got {type(comm).__name__} (mpi4py is not "
            "installed: pip install 'arrayattn[distributed]')"
        ) from None
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(
            f"comm: expected an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), "
            f"got {type(comm).__name__}"
        )
    return _Comm(comm)


def _agree(comm: _Comm, error: Exception | None, signature: dict[str, Any]) -> None:
    """Raise the same error on every rank when any rank's arguments are bad or differ.

    A collective: every rank must reach it, so each rank's own checks are caught before it and
    their outcome is exchanged here.
    """
    local = None if error is None else (type(error).__name__, str(error))
    gathered = comm.comm.allgather((local, signature))
    errors = [(rank, e) for rank, (e, _) in enumerate(gathered) if e is not None]
    if errors:
        rank, (kind, message) = next(((r, e) for r, e in errors if r == comm.rank), errors[0])
        exc_type = TypeError if kind == "TypeError" else ValueError
        if rank != comm.rank:
            message = f"{message} (raised on rank {rank} of {comm.size})"
        raise exc_type(message) from error
    for rank, (_, theirs) in enumerate(gathered):
        for name, value in signature.items():
            if theirs[name] != value:
                raise (TypeError if name == "dtype" else ValueError)(
                    f"{name}: every rank must pass the same {_WHAT.get(name, 'value')}; rank "
                    f"{comm.rank} has {value!r}, rank {rank} has {theirs[name]!r}"
                )


_WHAT = {
    "q": "shard shape",
    "k": "shard shape",
    "v": "shard shape",
    "dtype": "dtype",
}


_TRACE: ContextVar[list[dict[str, Any]] | None] = ContextVar("arrayattn_mpi_trace", default=None)


@contextlib.contextmanager
def _tracing() -> Iterator[list[dict[str, Any]]]:
    """Record this rank's communication events while the block runs (a private instrument).

    Events are dicts with ``kind`` ``'send'`` (``phase``, ``step``, ``nbytes``: bytes to other
    ranks), ``'compute'`` (``phase``, ``step``, ``t0``, ``t1``) and ``'exchange'`` (``phase``,
    ``step``, ``posted``, ``done``: when its requests were posted and completed, ``waited``: when
    the main thread started waiting for them).
    """
    events: list[dict[str, Any]] = []
    token = _TRACE.set(events)
    try:
        yield events
    finally:
        _TRACE.reset(token)


def _record(kind: str, **data: Any) -> None:
    events = _TRACE.get()
    if events is not None:
        events.append({"kind": kind, **data})


def _native(x: Array) -> Any:
    """numpy or cupy: the module whose ndarray methods (view, ascontiguousarray) x has."""
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy
    import numpy

    return numpy


def _contiguous(x: Array) -> Array:
    return _native(x).ascontiguousarray(x)


def _bytes(x: Array) -> Array:
    """A contiguous array as a flat byte buffer: any dtype (bfloat16 too) travels as MPI.BYTE."""
    return x.reshape(-1).view("u1")


def _ready(arrays: Sequence[Array]) -> None:
    """CUDA-aware MPI reads device memory directly: the kernels that wrote it must be done."""
    if any(array_api_compat.is_cupy_array(a) for a in arrays):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


class _Exchange:
    """Send arrays to ``dest`` and receive arrays of the same shapes and dtypes from ``source``.

    Non-blocking: the requests are posted at construction; :meth:`finish` returns the received
    arrays. Where the thread level allows, a helper thread sits in ``Waitall`` meanwhile: MPI only
    moves a large message while some thread is inside the library, and the main thread is
    computing.
    """

    def __init__(self, comm, send, dest, source, tag, phase, step):
        from mpi4py import MPI

        self._mpi = MPI
        send = [_contiguous(a) for a in send]
        _ready(send)
        self.recv = [_native(a).empty_like(a) for a in send]
        self.send = send  # kept alive (and unmodified) until the sends complete
        self.phase, self.step = phase, step
        self.requests = [
            comm.Irecv(_bytes(r), source=source, tag=tag + i) for i, r in enumerate(self.recv)
        ] + [comm.Isend(_bytes(s), dest=dest, tag=tag + i) for i, s in enumerate(send)]
        self.posted = time.perf_counter()
        self.done: float | None = None
        _record("send", phase=phase, step=step, nbytes=sum(s.nbytes for s in send))
        self._thread = None
        if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
            started = threading.Event()
            self._thread = threading.Thread(target=self._wait, args=(started,), daemon=True)
            self._thread.start()
            # The thread must be inside Waitall (which releases the GIL) before the main thread
            # enters a kernel that holds the GIL, or it would not run until that kernel returns.
            started.wait()

    def _wait(self, started: threading.Event) -> None:
        started.set()
        self._mpi.Request.Waitall(self.requests)
        self.done = time.perf_counter()

    def finish(self) -> list[Array]:
        waited = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        else:
            self._mpi.Request.Waitall(self.requests)
            self.done = time.perf_counter()
        _record(
            "exchange",
            phase=self.phase,
            step=self.step,
            posted=self.posted,
            done=self.done,
            waited=waited,
        )
        return self.recv


def _segments(layout: str, rank: int, size: int, n: int) -> list[tuple[int, int, int]]:
    """(global start, local start, length) of each contiguous run of a rank's shard of length n."""
    if layout == "contiguous":
        return [(rank * n, 0, n)]
    c = n // 2
    return [(rank * c, 0, c), ((2 * size - 1 - rank) * c, c, c)]


def _offset(causal: str | None, lq: int, lk: int) -> int | None:
    """Global key j is kept for query i iff ``j <= i + offset`` (None: not causal)."""
    if causal is None:
        return None
    return 0 if causal == "top_left" else lk - lq


def _block_calls(qsegs, ksegs, nq: int, nk: int, offset: int | None) -> list[tuple]:
    """The SDPA calls that cover a query shard against a key shard under the causal rule.

    Each call is ``(q0, q1, k0, k1, mode)`` in shard-local rows, ``mode`` ``None`` (every key),
    ``'bottom_right'``, or ``'top_left'`` (the same rule, where the band starts on the diagonal).
    For a query run at global ``gq`` and a key run at ``gk``, local query ``i`` keeps local keys
    ``j <= i + δ`` with ``δ = gq - gk + offset``: rows with ``i + δ < 0`` see no key (skipped),
    rows with ``i + δ >= len(keys) - 1`` see every key, and the band between is one bottom-right
    causal call on the first ``i1 + δ`` keys. So no call needs a mask.
    """
    if offset is None:
        return [(0, nq, 0, nk, None)] if nq and nk else []
    calls: list[tuple] = []
    for gq, lq0, a in qsegs:
        for gk, lk0, b in ksegs:
            if not (a and b):
                continue
            d = gq - gk + offset
            lo = min(max(-d, 0), a)
            hi = min(max(b - d, lo), a)
            if hi > lo:  # square bands (lo + d == 0) are top-left causal: the same rule
                mode = "top_left" if lo + d == 0 else "bottom_right"
                calls.append((lq0 + lo, lq0 + hi, lk0, lk0 + hi + d, mode))
            if a > hi:
                calls.append((lq0 + hi, lq0 + a, lk0, lk0 + b, None))
    return _coalesce(calls)


def _coalesce(calls: list[tuple]) -> list[tuple]:
    """Join full (unmasked) calls over adjacent key runs or adjacent query runs into one call."""
    calls = sorted(calls, key=lambda c: (c[4] is not None, c[:4]))
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(calls):
            for j, b in enumerate(calls):
                if i == j or a[4] is not None or b[4] is not None:
                    continue
                if a[:2] == b[:2] and a[3] == b[2]:
                    new = (a[0], a[1], a[2], b[3], None)
                elif a[2:4] == b[2:4] and a[1] == b[0]:
                    new = (a[0], b[1], a[2], a[3], None)
                else:
                    continue
                calls = [c for n, c in enumerate(calls) if n not in (i, j)] + [new]
                merged = True
                break
            if merged:
                break
    return sorted(calls, key=lambda c: (c[0], c[2]))


class _RingPlan:
    """The calls of every (this rank's queries, rank s's keys) pair of one ring_attention call."""

    def __init__(self, options: RingOptions, nq: int, nk: int):
        comm = options.comm
        self.rank, self.size = comm.rank, comm.size
        layout = options.layout
        offset = _offset(options.causal, self.size * nq, self.size * nk)
        qsegs = _segments(layout, self.rank, self.size, nq)
        self.calls = {
            s: _block_calls(qsegs, _segments(layout, s, self.size, nk), nq, nk, offset)
            for s in range(self.size)
        }

    def source(self, step: int) -> int:
        """The rank whose key/value block this rank holds at ``step``."""
        return (self.rank - step) % self.size


def _add_rows(acc: Array | None, rows: tuple[int, int], piece: Array, shape, dtype) -> Array:
    """``acc[..., r0:r1, :] += piece`` into a buffer of this op's own (created on first use)."""
    xp = array_api_compat.array_namespace(piece)
    r0, r1 = rows
    if acc is None:
        if r0 == 0 and r1 == shape[-2]:
            return xp.astype(piece, dtype, copy=False)  # ours: SDPA never returns views
        acc = xp.zeros(shape, dtype=dtype, device=array_api_compat.device(piece))
    acc[..., r0:r1, :] += xp.astype(piece, dtype, copy=False)
    return acc


def _sdpa_kwargs(options: RingOptions, mode: str | None) -> dict[str, Any]:
    return {
        "causal": mode or False,
        "scale": options.scale,
        "enable_gqa": options.gqa_groups > 1,
        "return_lse": True,
    }


def _template(res: Residuals, q, k, v, out, lse) -> Residuals:
    """SDPA's residual record with its arrays dropped: backward refills it block by block.

    Every backend's SDPA saves its array arguments and outputs under their names (``q``, ``k``,
    ``v``, ``mask``, ``bias``, ``out``, ``lse``); checked here, since backward swaps in the merged
    ``out``/``lse`` under those keys.
    """
    given = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
    if any(res.arrays.get(key) is not a for key, a in given.items()) or any(
        a is not None for key, a in res.arrays.items() if key not in given
    ):
        raise RuntimeError(
            f"ring_attention: the {res.backend} backend's scaled_dot_product_attention saves "
            f"residuals {sorted(res.arrays)} in a layout ring_attention cannot refill"
        )
    return res.with_arrays(dict.fromkeys(res.arrays))


def _block_residuals(sdpa, template: Residuals, options, mode, q, k, v, out, lse) -> Residuals:
    """The residuals of one block's SDPA as if its forward had produced the merged out and lse.

    With ``out``/``lse`` of the whole row, SDPA's backward computes ``p = exp(s - lse)`` and
    ``D = rowsum(dO ⊙ out)`` of the whole attention, so the block's gradients are its share of the
    whole attention's (ring attention's backward, Liu et al. 2023).
    """
    call = sdpa._prepare(q, k, v, **_sdpa_kwargs(options, mode))
    arrays = dict(template.arrays)
    arrays.update(q=q, k=k, v=v, out=out, lse=lse)
    return Residuals(
        op=template.op,
        backend=template.backend,
        arrays=arrays,
        options=call.options,
        outputs=(("out", tuple(out.shape), out.dtype), ("lse", tuple(lse.shape), lse.dtype)),
    )


def _ring_fwd(xp, arrays, options, save, *, ops):
    sdpa = ops.scaled_dot_product_attention
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    comm = options.comm
    plan = _RingPlan(options, q.shape[-2], k.shape[-2])
    right, left = (plan.rank + 1) % plan.size, (plan.rank - 1) % plan.size
    cdt = compute_dtype(xp, q.dtype)
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    out = lse = template = None
    block = (k, v)
    for step in range(plan.size):
        exchange = None
        if step + 1 < plan.size:  # the next block travels while this one is computed
            exchange = _Exchange(comm.comm, block, right, left, _TAG_KV, "forward", step)
        t0 = time.perf_counter()
        for q0, q1, k0, k1, mode in plan.calls[plan.source(step)]:
            qb, kb, vb = q[..., q0:q1, :], block[0][..., k0:k1, :], block[1][..., k0:k1, :]
            (o, part_lse), res = sdpa.fwd(qb, kb, vb, **_sdpa_kwargs(options, mode))
            if save and template is None:
                template = _template(res, qb, kb, vb, o, part_lse)
            if out is None and (q0, q1) == (0, q.shape[-2]):
                out, lse = xp.astype(o, cdt, copy=False), part_lse
                continue
            if out is None:  # rows no block reaches stay empty: output 0, logsumexp +inf
                out = xp.zeros(out_shape, dtype=cdt, device=array_api_compat.device(q))
                lse = xp.full(out_shape[:-1], xp.inf, dtype=part_lse.dtype, device=out.device)
            merged = merge_forward(
                xp, (out[..., q0:q1, :], xp.astype(o, cdt, copy=False)), (lse[..., q0:q1], part_lse)
            )
            out[..., q0:q1, :], lse[..., q0:q1] = merged
        _record("compute", phase="forward", step=step, t0=t0, t1=time.perf_counter())
        if exchange is not None:
            block = tuple(exchange.finish())
    if out is None:  # no query of this shard sees any key
        out = xp.zeros(out_shape, dtype=cdt, device=array_api_compat.device(q))
        lse_dtype = xp.float64 if q.dtype == xp.float64 else xp.float32
        lse = xp.full(out_shape[:-1], xp.inf, dtype=lse_dtype, device=out.device)
    out = xp.astype(out, q.dtype, copy=False)
    saved = {}
    if save:
        saved = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "sdpa": template}
    return (out,), saved


def _ring_bwd(xp, saved, options, cotangents, *, ops):
    sdpa = ops.scaled_dot_product_attention
    (dout,) = cotangents
    q, k, v, out, lse = (saved[n] for n in ("q", "k", "v", "out", "lse"))
    template = saved.get("sdpa")
    comm = options.comm
    plan = _RingPlan(options, q.shape[-2], k.shape[-2])
    right, left = (plan.rank + 1) % plan.size, (plan.rank - 1) % plan.size
    cdt = compute_dtype(xp, q.dtype)
    dq = None
    block = (k, v)
    grads_in = None  # the dK/dV accumulators of the block this rank holds, from the left
    for step in range(plan.size):
        exchange = None
        if step + 1 < plan.size:
            exchange = _Exchange(comm.comm, block, right, left, _TAG_KV, "backward", step)
        t0 = time.perf_counter()
        dk = dv = None
        for q0, q1, k0, k1, mode in plan.calls[plan.source(step)]:
            rows = (..., slice(q0, q1), slice(None))
            kb, vb = block[0][..., k0:k1, :], block[1][..., k0:k1, :]
            res = _block_residuals(
                sdpa, template, options, mode, q[rows], kb, vb, out[rows], lse[..., q0:q1]
            )
            g = sdpa.bwd(res, (dout[rows], None))
            dq = _add_rows(dq, (q0, q1), g.q, q.shape, cdt)
            dk = _add_rows(dk, (k0, k1), g.k, k.shape, cdt)
            dv = _add_rows(dv, (k0, k1), g.v, v.shape, cdt)
        if dk is None:
            dk = xp.zeros(k.shape, dtype=cdt, device=array_api_compat.device(k))
            dv = xp.zeros(v.shape, dtype=cdt, device=array_api_compat.device(v))
        if grads_in is not None:  # add this rank's share to what the ranks before it found
            dk_in, dv_in = grads_in.finish()
            dk, dv = dk + dk_in, dv + dv_in
        _record("compute", phase="backward", step=step, t0=t0, t1=time.perf_counter())
        if plan.size > 1:  # pass the accumulators on; after the last step they reach their owner
            grads_in = _Exchange(comm.comm, (dk, dv), right, left, _TAG_DKV, "gradients", step)
        if exchange is not None:
            block = tuple(exchange.finish())
    if grads_in is not None:
        dk, dv = grads_in.finish()
    if dq is None:
        dq = xp.zeros(q.shape, dtype=cdt, device=array_api_compat.device(q))
    return {
        "q": xp.astype(dq, q.dtype, copy=False),
        "k": xp.astype(dk, k.dtype, copy=False),
        "v": xp.astype(dv, v.dtype, copy=False),
    }


def _alltoall(comm: _Comm, pieces: Sequence[Array], phase: str) -> list[Array]:
    """One ``Alltoall`` of several arrays shaped (P, ...): row p goes to rank p.

    Returns arrays of the same shapes, whose row p came from rank p. The arrays travel as one
    byte buffer per destination, so one collective carries all of them.
    """
    from mpi4py import MPI

    size = comm.size
    pieces = [_contiguous(p) for p in pieces]
    mod = _native(pieces[0])
    rows = [
        p.reshape(size, -1).view("u1") if p.size else p.reshape(size, 0).view("u1") for p in pieces
    ]
    send = mod.ascontiguousarray(mod.concatenate(rows, axis=1)) if len(rows) > 1 else rows[0]
    _ready([send])
    recv = mod.empty_like(send)
    _record("send", phase=phase, step=0, nbytes=send.nbytes * (size - 1) // size)
    comm.comm.Alltoall([send, MPI.BYTE], [recv, MPI.BYTE])
    out, start = [], 0
    for p, r in zip(pieces, rows, strict=True):
        width = r.shape[1]
        chunk = mod.ascontiguousarray(recv[:, start : start + width])
        out.append(chunk.view(p.dtype).reshape(p.shape))
        start += width
    return out


def _to_heads(xp, comm: _Comm, arrays: Sequence[Array], phase: str) -> list[Array]:
    """Sequence shards (..., H, n, d) on every rank -> full sequences (..., H/P, P·n, d)."""
    size = comm.size
    pieces = []
    for x in arrays:
        *lead, h, n, d = x.shape
        split = xp.reshape(x, (*lead, size, h // size, n, d))
        pieces.append(xp.moveaxis(split, -4, 0))  # (P, ..., H/P, n, d): group p goes to rank p
    got = _alltoall(comm, pieces, phase)
    full = []
    for r in got:  # r[p]: rank p's sequence shard of this rank's heads
        _, *lead, hp, n, d = r.shape
        full.append(xp.reshape(xp.moveaxis(r, 0, -3), (*lead, hp, size * n, d)))
    return full


def _to_sequence(xp, comm: _Comm, arrays: Sequence[Array], phase: str) -> list[Array]:
    """Full sequences (..., H/P, P·n, d) -> sequence shards (..., H, n, d) (the inverse)."""
    size = comm.size
    pieces = []
    for y in arrays:
        *lead, hp, length, d = y.shape
        split = xp.reshape(y, (*lead, hp, size, length // size, d))
        pieces.append(xp.moveaxis(split, -3, 0))  # (P, ..., H/P, n, d): shard p goes to rank p
    got = _alltoall(comm, pieces, phase)
    shards = []
    for r in got:  # r[p]: this rank's sequence shard of rank p's heads
        _, *lead, hp, n, d = r.shape
        shards.append(xp.reshape(xp.moveaxis(r, 0, -4), (*lead, size * hp, n, d)))
    return shards


def _ulysses_fwd(xp, arrays, options, save, *, ops):
    sdpa = ops.scaled_dot_product_attention
    comm = options.comm
    qf, kf, vf = _to_heads(xp, comm, [arrays["q"], arrays["k"], arrays["v"]], "forward")
    kwargs = {
        "causal": options.causal or False,
        "scale": options.scale,
        "enable_gqa": options.gqa_groups > 1,
    }
    t0 = time.perf_counter()
    if save:
        of, res = sdpa.fwd(qf, kf, vf, **kwargs)
    else:
        of, res = sdpa(qf, kf, vf, **kwargs), None
    _record("compute", phase="forward", step=0, t0=t0, t1=time.perf_counter())
    (out,) = _to_sequence(xp, comm, [of], "forward")
    return (out,), ({"attn": res} if save else {})


def _ulysses_bwd(xp, saved, options, cotangents, *, ops):
    sdpa = ops.scaled_dot_product_attention
    comm = options.comm
    (dof,) = _to_heads(xp, comm, [cotangents[0]], "backward")
    t0 = time.perf_counter()
    g = sdpa.bwd(saved["attn"], dof)
    _record("compute", phase="backward", step=0, t0=t0, t1=time.perf_counter())
    dq, dk, dv = _to_sequence(xp, comm, [g.q, g.k, g.v], "backward")
    return {"q": dq, "k": dk, "v": dv}


@dataclass(frozen=True)
class RingOptions(Options):
    comm: _Comm
    causal: str | None
    scale: float
    gqa_groups: int
    layout: str = "contiguous"


@dataclass(frozen=True)
class UlyssesOptions(Options):
    comm: _Comm
    causal: str | None
    scale: float
    gqa_groups: int


RING_RESIDUALS = ("q", "k", "v", "out", "lse", "sdpa")
ULYSSES_RESIDUALS = ("attn",)
_USES = ("scaled_dot_product_attention",)
RING_REFERENCE = Kernel(_ring_fwd, _ring_bwd, dtypes=None, uses=_USES)
ULYSSES_REFERENCE = Kernel(_ulysses_fwd, _ulysses_bwd, dtypes=None, uses=_USES)

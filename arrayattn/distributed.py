"""Sequence parallelism over MPI: exact ring attention and all-to-all (Ulysses) attention.

Both ops take this rank's shard of ``q``, ``k``, ``v`` along the sequence axis (-2) and an
``mpi4py`` communicator, and return this rank's shard of exactly what
:func:`~arrayattn.scaled_dot_product_attention` gives on the gathered arrays; their backward returns
this rank's shard of each gradient. The local blocks run through
:func:`~arrayattn.scaled_dot_product_attention` on the active backend (the Numba kernel for
NumPy arrays on CPU). Every rank must call the op, with equal shard shapes and equal options: a
shard or an option that does not fit raises the same ``ValueError``/``TypeError`` on every rank
rather than leaving the others waiting.

Transport (``mpi4py``, any MPI): ring attention posts non-blocking sends and receives
(``Isend``/``Irecv``) of the next key/value block before computing on the current one; where MPI
gives ``MPI_THREAD_MULTIPLE`` a helper thread waits on those requests, so that MPI's progress engine
runs (and large messages move) while the main thread computes. NumPy arrays work with any MPI; CuPy
arrays are passed to MPI as device buffers and need a CUDA-aware MPI (not validated here: this
project's CI has no GPU). The ops use point-to-point tags ``_TAG_*`` below on ``comm``; do not
leave other messages with those tags pending on it.

These ops are not in :func:`arrayattn.registered_ops`: a communicator cannot travel through the
framework adapters or ``python -m arrayattn check``, which work on one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat

from . import _checks as checks
from ._glue.distributed import (
    RING_REFERENCE,
    RING_RESIDUALS,
    ULYSSES_REFERENCE,
    ULYSSES_RESIDUALS,
    RingOptions,
    UlyssesOptions,
    _agree,
    _check_comm,
    _segments,
)
from ._kernel import Call, Residuals
from ._op import Op
from ._xp import Array
from .attention import scaled_dot_product_attention

__all__ = ["ring_attention", "shard", "ulysses_attention", "unshard"]

_LAYOUTS = ("contiguous", "zigzag")
_CAUSAL = (False, True, "top_left", "bottom_right")


# -- the communicator as a static option ----------------------------------------------------------


class _CollectiveOp(Op):
    """An op whose calls are collectives over the communicator in its options.

    Backward checks the cotangent on every rank and agrees on the outcome first, so a bad
    cotangent on one rank raises there and on the others instead of leaving them in the ring.
    """

    def _check_cotangents(self, res: Residuals, cotangents: Any) -> tuple[Array, ...]:
        comm = res.options.comm  # type: ignore[attr-defined]  # Ring/UlyssesOptions
        error, cts = None, ()
        try:
            cts = super()._check_cotangents(res, cotangents)
        except (TypeError, ValueError) as exc:
            error = exc
        _agree(comm, error, {})
        return cts


def _collective_op(*, differentiable, reference, residuals):
    def wrap(prepare):
        return _CollectiveOp(
            prepare, differentiable=differentiable, reference=reference, residuals=residuals
        )

    return wrap


# -- tracing (bytes sent and timestamps, for tests and the figures in docs/scaling.rst) -----------


# -- buffers --------------------------------------------------------------------------------------


# -- shards ---------------------------------------------------------------------------------------


def shard(x: Array, rank: int, size: int, *, layout: str = "contiguous") -> Array:
    """Rank ``rank``'s shard of a full sequence ``x (..., L, d)`` along axis -2.

    ``'contiguous'``: rows ``[rank·L/P, (rank+1)·L/P)``. ``'zigzag'``: chunks ``rank`` and
    ``2P-1-rank`` of ``2P`` equal chunks, concatenated (this balances causal attention's work over
    the ranks of a ring). The inverse is :func:`unshard`.

    Parameters
    ----------
    x : array, shape (..., L, d)
    rank, size : int
        This rank and the number of ranks ``P``; ``L`` must divide by ``P`` (``2P`` for zigzag).
    layout : {'contiguous', 'zigzag'}

    Returns
    -------
    array, shape (..., L/P, d)

    Examples
    --------
    >>> import numpy as np
    >>> from arrayattn.distributed import shard, unshard
    >>> x = np.arange(8.0)[:, None]                              # (L, d) = (8, 1)
    >>> shard(x, 0, 2, layout="zigzag")[:, 0]
    array([0., 1., 6., 7.])
    >>> parts = [shard(x, r, 2, layout="zigzag") for r in range(2)]
    >>> bool((unshard(parts, layout="zigzag") == x).all())
    True
    """
    checks.check_choice("layout", layout, _LAYOUTS)
    size = checks.check_int("size", size, minimum=1)
    rank = checks.check_int("rank", rank, minimum=0)
    if rank >= size:
        raise ValueError(f"rank: expected 0 <= rank < size = {size}, got {rank}")
    checks.check_ndim("x", x, 2, "(..., L, d)")
    length = x.shape[-2]
    parts = size * (2 if layout == "zigzag" else 1)
    if length % parts:
        raise ValueError(
            f"x: layout={layout!r} cuts the sequence (axis -2) into {parts} equal parts; "
            f"L = {length} is not divisible by {parts}"
        )
    xp = array_api_compat.array_namespace(x)
    n = length // size
    pieces = [x[..., g : g + m, :] for g, _, m in _segments(layout, rank, size, n)]
    return xp.concat(pieces, axis=-2) if len(pieces) > 1 else xp.asarray(pieces[0], copy=True)


def unshard(shards: Sequence[Array], *, layout: str = "contiguous") -> Array:
    """The full sequence from every rank's shard, in rank order (the inverse of :func:`shard`).

    Parameters
    ----------
    shards : sequence of arrays, shape (..., L/P, d)
        Shard ``r`` from rank ``r`` (e.g. ``comm.allgather(local)``).
    layout : {'contiguous', 'zigzag'}

    Returns
    -------
    array, shape (..., L, d)
    """
    checks.check_choice("layout", layout, _LAYOUTS)
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one shard per rank, got none")
    xp = array_api_compat.array_namespace(*shards)
    size, n = len(shards), shards[0].shape[-2]
    runs = []
    for rank, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(
                f"shards[{rank}]: expected shape {tuple(shards[0].shape)} like shards[0], "
                f"got {tuple(s.shape)}"
            )
        if layout == "zigzag" and n % 2:
            raise ValueError(f"shards: a zigzag shard holds 2 equal chunks; got {n} rows")
        runs += [(g, s[..., a : a + m, :]) for g, a, m in _segments(layout, rank, size, n)]
    return xp.concat([piece for _, piece in sorted(runs, key=lambda r: r[0])], axis=-2)


# -- ring attention: which local blocks a (query shard, key shard) pair needs ---------------------


# -- ring attention: forward and backward ---------------------------------------------------------


# -- validation shared by both ops ----------------------------------------------------------------


def _prepare_shards(op_name, q, k, v, comm, causal, scale, enable_gqa, extra_checks, **options):
    """Each rank checks its own shards, then all ranks agree (or all raise the same error)."""
    ring = _check_comm(comm)
    error, inner, xp = None, None, None
    try:
        inner = scaled_dot_product_attention._prepare(
            q, k, v, causal=causal, scale=scale, enable_gqa=enable_gqa
        )
        xp = inner.xp
        if not (array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp)):
            raise TypeError(
                f"q: {op_name} sends buffers through MPI and takes NumPy (or CuPy) arrays, "
                f"got {type(q).__name__}"
            )
        extra_checks(ring)
    except (TypeError, ValueError) as exc:
        error = exc
    signature = {
        "q": tuple(getattr(q, "shape", ())),
        "k": tuple(getattr(k, "shape", ())),
        "v": tuple(getattr(v, "shape", ())),
        "dtype": str(getattr(q, "dtype", None)),
        "causal": causal if isinstance(causal, (bool, str)) else repr(causal),
        "scale": scale if scale is None or isinstance(scale, (int, float)) else repr(scale),
        "enable_gqa": enable_gqa,
        **{name: repr(value) for name, value in options.items()},
    }
    _agree(ring, error, signature)
    return ring, inner, xp


def _check_rows(name: str, x: Array, parts: int, layout: str) -> None:
    if x.shape[-2] % parts:
        raise ValueError(
            f"{name}: layout={layout!r} holds {parts} equal chunks of the sequence per rank; "
            f"a shard of {x.shape[-2]} rows (axis -2) cannot be split so"
        )


@_collective_op(
    differentiable=("q", "k", "v"),
    reference=RING_REFERENCE,
    residuals=RING_RESIDUALS,
)
def ring_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    comm: Any,
    causal: bool | str = False,
    scale: float | None = None,
    layout: str = "contiguous",
    enable_gqa: bool = False,
) -> Call[Array]:
    r"""Exact attention over a sequence sharded across MPI ranks, by passing K/V around a ring.

    Each rank holds one shard of the queries and one of the keys/values. Over ``P`` steps the
    key/value blocks travel once around the ring (rank ``r`` sends to ``r+1`` and receives from
    ``r-1``, non-blocking, while it computes on the block it holds); each rank attends its queries
    to every block with :func:`~arrayattn.scaled_dot_product_attention` and merges the partial
    results by their logsumexp (:func:`~arrayattn.merge_attention`). Backward sends the blocks
    around again, each rank adds its share of the block's dK/dV to an accumulator that travels with
    it, and after the last step every accumulator reaches the rank that owns the block (Liu et al.,
    *Ring Attention with Blockwise Transformers*, 2023). The result equals
    :func:`~arrayattn.scaled_dot_product_attention` on the gathered arrays up to rounding.

    Parameters
    ----------
    q : array, shape (..., Lq/P, d)
        This rank's query shard (NumPy; CuPy with a CUDA-aware MPI).
    k : array, shape (..., Lk/P, d)
        This rank's key shard.
    v : array, shape (..., Lk/P, dv)
        This rank's value shard.
    comm : mpi4py communicator
        Every rank of ``comm`` calls the op with shards of equal shapes and the same options.
    causal : bool or {'top_left', 'bottom_right'}, default False
        As in :func:`~arrayattn.scaled_dot_product_attention`, on the gathered sequence
        (``Lq = P·Lq/P`` queries, ``Lk = P·Lk/P`` keys). Blocks above the diagonal are skipped
        and none needs a mask.
    scale : float, optional
        Logit scale; ``None`` means ``1/sqrt(d)``.
    layout : {'contiguous', 'zigzag'}, default 'contiguous'
        Which positions rank ``r`` holds. ``'contiguous'``: ``[r·L/P, (r+1)·L/P)``.
        ``'zigzag'``: chunks ``r`` and ``2P-1-r`` of ``2P`` equal chunks (shard lengths must be
        even), which gives every rank the same causal work. :func:`shard` and :func:`unshard`
        convert.
    enable_gqa : bool, default False
        Grouped-query attention as in :func:`~arrayattn.scaled_dot_product_attention`: ``k`` and
        ``v`` carry fewer heads (axis -3), and only they travel.

    Returns
    -------
    out : array, shape (..., Lq/P, dv)
        This rank's shard of the output, in the dtype of ``q``.

    Notes
    -----
    Shape legend: ``...`` batch and head dimensions, ``P`` ranks, ``Lq``/``Lk`` gathered lengths,
    ``d`` query/key width, ``dv`` value width. ``.bwd`` returns this rank's shards of the
    gradients of ``q``, ``k`` and ``v``. Per rank, a forward sends ``(P-1)·Lk/P·(d+dv)`` elements
    of the input dtype and a backward ``(P-1)·Lk/P·(d+dv)`` of the input dtype plus
    ``P·Lk/P·(d+dv)`` of the accumulation dtype (float32 for float16/bfloat16), times the batch
    and kv-head sizes (see the *Scaling out* page). Collective: every rank must call ``fwd``,
    ``bwd`` and the op itself together.

    Examples
    --------
    With one rank (``MPI.COMM_SELF``) it is plain attention; run the same code under
    ``mpiexec -n 4`` with ``MPI.COMM_WORLD`` to spread the sequence over four processes.

    >>> import numpy as np
    >>> from mpi4py import MPI
    >>> import arrayattn as aa
    >>> from arrayattn.distributed import ring_attention, shard
    >>> comm = MPI.COMM_SELF
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 4, 16, 8))        # gathered (N, H, L, d)
    >>> mine = [shard(x, comm.rank, comm.size) for x in (q, k, v)]
    >>> out, res = ring_attention.fwd(*mine, comm=comm, causal=True)
    >>> g = ring_attention.bwd(res, np.ones_like(out))
    >>> bool(np.allclose(out, aa.scaled_dot_product_attention(q, k, v, causal=True)))
    True
    >>> g.k.shape
    (2, 4, 16, 8)
    """

    def layout_checks(ring):  # numpydoc ignore=GL08
        checks.check_choice("layout", layout, _LAYOUTS)
        if layout == "zigzag":
            _check_rows("q", q, 2, layout)
            _check_rows("k", k, 2, layout)

    ring, inner, xp = _prepare_shards(
        "ring_attention", q, k, v, comm, causal, scale, enable_gqa, layout_checks, layout=layout
    )
    return Call(
        xp,
        {"q": q, "k": k, "v": v},
        RingOptions(
            comm=ring,
            causal=inner.options.causal,
            scale=inner.options.scale,
            gqa_groups=inner.options.gqa_groups,
            layout=layout,
        ),
    )


# -- all-to-all (Ulysses) attention ---------------------------------------------------------------


@_collective_op(
    differentiable=("q", "k", "v"),
    reference=ULYSSES_REFERENCE,
    residuals=ULYSSES_RESIDUALS,
)
def ulysses_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    comm: Any,
    causal: bool | str = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Call[Array]:
    r"""Exact attention over a sequence sharded across MPI ranks, by two all-to-alls over heads.

    DeepSpeed-Ulysses: one ``Alltoall`` turns every rank's sequence shard of all ``H`` heads into
    the full sequence of ``H/P`` heads; each rank runs
    :func:`~arrayattn.scaled_dot_product_attention` on its heads; one ``Alltoall`` brings the
    output back to sequence shards. Backward does the same with the cotangent and the gradients.
    Communication per rank is independent of ``P`` for a fixed total length, but ``P`` can be at
    most the number of heads.

    Parameters
    ----------
    q : array, shape (..., H, L/P, d)
        This rank's contiguous shard of the queries: rank ``r`` holds ``[r·L/P, (r+1)·L/P)``.
    k : array, shape (..., Hkv, Lk/P, d)
        This rank's key shard.
    v : array, shape (..., Hkv, Lk/P, dv)
        This rank's value shard.
    comm : mpi4py communicator
        Every rank of ``comm`` calls the op with shards of equal shapes and the same options.
        ``H`` and ``Hkv`` must divide by its size ``P``.
    causal : bool or {'top_left', 'bottom_right'}, default False
        As in :func:`~arrayattn.scaled_dot_product_attention`, on the gathered sequence.
    scale : float, optional
        Logit scale; ``None`` means ``1/sqrt(d)``.
    enable_gqa : bool, default False
        Grouped-query attention (``Hkv`` divides ``H``); rank p gets query heads
        ``[p·H/P, (p+1)·H/P)`` and their kv heads.

    Returns
    -------
    out : array, shape (..., H, L/P, dv)
        This rank's shard of the output.

    Notes
    -----
    Shape legend: ``...`` batch dimensions, ``H``/``Hkv`` query/kv heads, ``P`` ranks,
    ``L``/``Lk`` gathered lengths. Per rank, a forward sends ``(P-1)/P`` of its q, k, v and
    output shards, a backward ``(P-1)/P`` of its output cotangent and of dq, dk, dv (see the
    *Scaling out* page). Collective: every rank must call ``fwd``, ``bwd`` and the op together.

    Examples
    --------
    >>> import numpy as np
    >>> from mpi4py import MPI
    >>> import arrayattn as aa
    >>> from arrayattn.distributed import shard, ulysses_attention
    >>> comm = MPI.COMM_SELF
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 4, 16, 8))       # gathered (N, H, L, d)
    >>> mine = [shard(x, comm.rank, comm.size) for x in (q, k, v)]
    >>> out = ulysses_attention(*mine, comm=comm, causal=True)
    >>> bool(np.allclose(out, aa.scaled_dot_product_attention(q, k, v, causal=True)))
    True
    """

    def head_checks(ring):  # numpydoc ignore=GL08
        if q.ndim < 3:
            raise ValueError(
                f"q: ulysses_attention splits the heads, shape (..., H, L/P, d), "
                f"got {tuple(q.shape)}"
            )
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.shape[-3] % ring.size:
                raise ValueError(
                    f"{name}: ulysses_attention splits the heads (axis -3) over the "
                    f"{ring.size} ranks of comm; {x.shape[-3]} heads are not divisible by "
                    f"{ring.size}"
                )

    ring, inner, xp = _prepare_shards(
        "ulysses_attention", q, k, v, comm, causal, scale, enable_gqa, head_checks
    )
    return Call(
        xp,
        {"q": q, "k": k, "v": v},
        UlyssesOptions(
            comm=ring,
            causal=inner.options.causal,
            scale=inner.options.scale,
            gqa_groups=inner.options.gqa_groups,
        ),
    )

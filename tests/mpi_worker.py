"""Run under ``mpiexec -n P``: ring and all-to-all attention against single-process attention.

Every rank builds the same gathered arrays from a fixed seed, runs the distributed op on its shard
and compares its shard of the outputs and gradients with
``scaled_dot_product_attention`` on the gathered arrays (which itself is tested against a dense
float64 oracle). Rank 0 prints one line ``RESULTS <json list, one summary per rank>``; the exit
status is non-zero if any check failed on any rank. Launched by tests/test_distributed.py.
"""

from __future__ import annotations

import json
import re
import sys
import traceback

import numpy as np
import pytest
from mpi4py import MPI

import arrayattn as aa
from arrayattn._glue.distributed import _tracing
from arrayattn.distributed import ring_attention, shard, ulysses_attention, unshard

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
SDPA = aa.scaled_dot_product_attention
FAILURES: list[str] = []
PASSED: list[str] = []


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    assert (np.isfinite(got) == fin).all(), "non-finite entries differ"
    return float(
        np.max(np.abs(got[fin] - want[fin]), initial=0.0) / max(np.max(np.abs(want)), 1e-300)
    )


def check(name: str, fn) -> None:
    try:
        fn()
        PASSED.append(name)
    except Exception:
        FAILURES.append(f"{name}: {traceback.format_exc(limit=4)}")


def gathered(seed, q_shape, k_shape, dv, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(q_shape)
    k = rng.standard_normal(k_shape)
    v = rng.standard_normal((*k_shape[:-1], dv))
    dout = rng.standard_normal((*q_shape[:-1], dv))
    return tuple(a.astype(dtype) for a in (q, k, v, dout))


def compare(op, q, k, v, dout, *, layout="contiguous", tol=1e-12, **options):
    """The op on this rank's shards equals SDPA on the gathered arrays (outputs and gradients)."""
    kw = {"layout": layout} if op is ring_attention else {}
    mine = [shard(x, RANK, SIZE, layout=layout) for x in (q, k, v, dout)]
    out, res = op.fwd(*mine[:3], comm=COMM, **kw, **options)
    g = op.bwd(res, mine[3])
    want, wres = SDPA.fwd(q, k, v, **options)
    wg = SDPA.bwd(wres, dout)
    assert out.dtype == q.dtype, out.dtype
    errors = {"out": rel_err(out, shard(want, RANK, SIZE, layout=layout))}
    for name, got, full in (("q", g.q, wg.q), ("k", g.k, wg.k), ("v", g.v, wg.v)):
        assert got.dtype == q.dtype, (name, got.dtype)
        errors["d" + name] = rel_err(got, shard(full, RANK, SIZE, layout=layout))
    # The gathered result too (every rank's shard in place), from this rank's view.
    whole = unshard(COMM.allgather(out), layout=layout)
    errors["gathered"] = rel_err(whole, want)
    worst = max(errors.values())
    assert worst <= tol, f"{errors} > {tol}"


def low_precision(op, dtype, **options):
    """float32/float16 shards: error against the float64 result within twice that of
    single-process SDPA in the same dtype (FlashAttention's criterion), plus a few ulps."""
    q, k, v, dout = gathered(7, (1, 12, 8 * SIZE, 8), (1, 12, 8 * SIZE, 8), 8)
    ref_out, ref_res = SDPA.fwd(q, k, v, **options)
    ref_g = SDPA.bwd(ref_res, dout)
    low = [x.astype(dtype) for x in (q, k, v, dout)]
    same_out, same_res = SDPA.fwd(*low[:3], **options)
    same_g = SDPA.bwd(same_res, low[3])
    kw = {"layout": "zigzag"} if op is ring_attention else {}
    layout = kw.get("layout", "contiguous")
    mine = [shard(x, RANK, SIZE, layout=layout) for x in low]
    out, res = op.fwd(*mine[:3], comm=COMM, **kw, **options)
    g = op.bwd(res, mine[3])
    eps = float(np.finfo(dtype).eps)
    for name, got, ref, same in (
        ("out", out, ref_out, same_out),
        ("dq", g.q, ref_g.q, same_g.q),
        ("dk", g.k, ref_g.k, same_g.k),
        ("dv", g.v, ref_g.v, same_g.v),
    ):
        assert got.dtype == dtype
        ref_mine = shard(ref, RANK, SIZE, layout=layout)
        err = np.max(np.abs(got.astype(np.float64) - ref_mine))
        budget = 2 * np.max(np.abs(same.astype(np.float64) - ref)) + 4 * eps * np.max(np.abs(ref))
        assert err <= budget, f"{name}: {err:.3e} > {budget:.3e}"


def expect_error(name, exc_type, match, fn):
    """Every rank raises exc_type with ``match`` in the message; then all ranks go on together."""

    def run():
        with pytest.raises(exc_type, match=re.escape(match)):
            fn()
        COMM.Barrier()  # everyone got here: nobody hangs in a collective

    check(name, run)


def traffic(op, q, k, v, dout, **options):
    """Bytes this rank sends per forward and per backward, counted, against the formula."""
    kw = {}
    mine = [shard(x, RANK, SIZE) for x in (q, k, v, dout)]
    with _tracing() as events:
        out, res = op.fwd(*mine[:3], comm=COMM, **kw, **options)
        op.bwd(res, mine[3])
    sent = {}
    for e in events:
        if e["kind"] == "send":
            sent[e["phase"]] = sent.get(e["phase"], 0) + e["nbytes"]
    p, item = SIZE, q.dtype.itemsize
    kv = mine[1].size + mine[2].size
    if op is ring_attention:
        want = {
            "forward": (p - 1) * kv * item,
            "backward": (p - 1) * kv * item,
            "gradients": (p * kv * item) if p > 1 else 0,
        }
    else:
        q_, o_ = mine[0].size, mine[3].size
        want = {
            "forward": (p - 1) * (q_ + kv + o_) * item // p,
            "backward": (p - 1) * (o_ + q_ + kv) * item // p,
        }
    sent = {phase: sent.get(phase, 0) for phase in want}
    assert sent == want, (sent, want)
    return sent


def main() -> int:
    n = 4  # rows per rank and per chunk pair
    L = 2 * n * SIZE
    for causal in (False, True):
        for layout in ("contiguous", "zigzag"):
            arrays = gathered(1, (2, 3, L, 5), (2, 3, L, 5), 4)
            check(
                f"ring causal={causal} {layout}",
                lambda a=arrays, c=causal, lay=layout: compare(
                    ring_attention, *a, layout=lay, causal=c
                ),
            )
    # Cross attention: Lq != Lk, both causal alignments, both layouts; and a scale.
    for causal in ("top_left", "bottom_right"):
        for layout in ("contiguous", "zigzag"):
            arrays = gathered(2, (1, 2, 2 * SIZE, 3), (1, 2, 6 * SIZE, 3), 2)
            check(
                f"ring cross {causal} {layout}",
                lambda a=arrays, c=causal, lay=layout: compare(
                    ring_attention, *a, layout=lay, causal=c, scale=0.3
                ),
            )
            arrays = gathered(3, (1, 2, 6 * SIZE, 3), (1, 2, 2 * SIZE, 3), 2)
            check(
                f"ring cross long-q {causal} {layout}",
                lambda a=arrays, c=causal, lay=layout: compare(
                    ring_attention, *a, layout=lay, causal=c
                ),
            )
    arrays = gathered(4, (2, 4, L, 6), (2, 2, L, 6), 5)
    for causal in (False, True):
        check(
            f"ring gqa causal={causal}",
            lambda c=causal: compare(
                ring_attention, *arrays, layout="zigzag", causal=c, enable_gqa=True
            ),
        )
    check("ring 3-d inputs", lambda: compare(ring_attention, *gathered(5, (3, L, 4), (3, L, 4), 4)))
    # Ulysses: heads must divide by P; 12 heads divide by 1, 2, 3 and 4.
    arrays = gathered(6, (2, 12, L, 4), (2, 12, L, 4), 3)
    for causal in (False, True):
        check(
            f"ulysses causal={causal}",
            lambda c=causal: compare(ulysses_attention, *arrays, causal=c),
        )
    arrays = gathered(8, (1, 12, 2 * SIZE, 4), (1, 12, 4 * SIZE, 4), 3)
    check(
        "ulysses cross bottom_right",
        lambda: compare(ulysses_attention, *arrays, causal="bottom_right"),
    )
    arrays = gathered(9, (1, 24, L, 4), (1, 12, L, 4), 3)  # 12 kv heads: divisible by 1..4
    check(
        "ulysses gqa",
        lambda: compare(ulysses_attention, *arrays, causal=True, enable_gqa=True),
    )
    for dtype in (np.float32, np.float16):
        for op in (ring_attention, ulysses_attention):
            check(
                f"{op.name} {np.dtype(dtype).name} causal",
                lambda o=op, dt=dtype: low_precision(o, dt, causal=True),
            )

    # Bad shards and options: every rank raises, nobody hangs.
    q, k, v, _ = gathered(10, (1, 4, 4 * SIZE, 4), (1, 4, 4 * SIZE, 4), 4)
    mine = [shard(x, RANK, SIZE) for x in (q, k, v)]
    odd = [x[..., :3, :] for x in mine]
    expect_error(
        "zigzag odd shard",
        ValueError,
        "layout='zigzag'",
        lambda: ring_attention(*odd, comm=COMM, layout="zigzag"),
    )
    if SIZE > 1:
        uneven = [x[..., : (3 if RANK == SIZE - 1 else 4), :] for x in mine]
        expect_error(
            "uneven shard on the last rank",
            ValueError,
            "every rank must pass the same shard shape",
            lambda: ring_attention(*uneven, comm=COMM),
        )
        expect_error(
            "layout differs",
            ValueError,
            "layout: every rank must pass the same value",
            lambda: ring_attention(
                *mine, comm=COMM, layout="zigzag" if RANK == SIZE - 1 else "contiguous"
            ),
        )
        expect_error(
            "causal differs",
            ValueError,
            "causal",
            lambda: ring_attention(*mine, comm=COMM, causal=RANK == 0),
        )
        bad_dtype = [x.astype(np.float32) if RANK == 1 else x for x in mine]
        expect_error(
            "one rank's k and v float32",
            TypeError,
            "k: expected dtype float64 (the dtype of q), got float32",
            lambda: ring_attention(mine[0], *bad_dtype[1:], comm=COMM),
        )
        expect_error(
            "one rank all float32",
            TypeError,
            "dtype: every rank must pass the same dtype",
            lambda: ring_attention(*bad_dtype, comm=COMM),
        )
    expect_error(
        "one rank's bad key width",
        ValueError,
        "k: expected last dimension",
        lambda: ring_attention(
            mine[0], mine[1][..., :3] if RANK == SIZE - 1 else mine[1], mine[2], comm=COMM
        ),
    )
    if SIZE > 1:
        bad = gathered(13, (1, SIZE + 1, 2 * SIZE, 4), (1, SIZE + 1, 2 * SIZE, 4), 4)[:3]
        bad = [shard(x, RANK, SIZE) for x in bad]
        expect_error(
            "ulysses heads not divisible",
            ValueError,
            "heads are not divisible",
            lambda: ulysses_attention(*bad, comm=COMM),
        )

    def bad_cotangent():
        out, res = ring_attention.fwd(*mine, comm=COMM, causal=True)
        ct = out[..., :-1] if RANK == 0 else np.ones_like(out)
        ring_attention.bwd(res, ct)

    expect_error("bad cotangent on rank 0", ValueError, "cotangent of out", bad_cotangent)

    sent = {}
    ring_arrays = gathered(11, (1, 2, L, 4), (1, 2, L, 4), 6)
    check(
        "ring bytes",
        lambda: sent.__setitem__("ring", traffic(ring_attention, *ring_arrays, causal=True)),
    )
    check(
        "ulysses bytes",
        lambda: sent.__setitem__(
            "ulysses", traffic(ulysses_attention, *gathered(12, (1, 12, L, 4), (1, 12, L, 4), 6))
        ),
    )
    summary = {"passed": len(PASSED), "failed": FAILURES, "bytes": sent}
    every = COMM.gather(summary, root=0)
    if RANK == 0:  # one writer: lines from several ranks would interleave on the shared pipe
        print("RESULTS " + json.dumps(every), flush=True)
    return 1 if COMM.allreduce(len(FAILURES)) else 0


if __name__ == "__main__":
    sys.exit(main())

"""arrayattn.distributed: ring and all-to-all attention over MPI.

The MPI tests launch ``mpiexec -n P`` (P = 1, 2, 3, 4; more ranks than cores is fine) on
tests/mpi_worker.py, which compares every rank's shard of the outputs and gradients with
single-process attention on the gathered arrays (1e-12 relative in float64; float32/float16 within
FlashAttention's criterion), checks that bad shards raise on every rank, and counts the bytes each
rank sends. The in-process tests cover the block plan of the ring (exactly the causal mask, every
pair covered once) and the shard layouts.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from arrayattn import distributed as dist  # noqa: E402
from arrayattn._glue import distributed as glue  # noqa: E402
from arrayattn.distributed import ring_attention, shard, ulysses_attention, unshard  # noqa: E402

WORKER = Path(__file__).with_name("mpi_worker.py")


def _mpiexec() -> str | None:
    local = Path(sys.executable).with_name("mpiexec")  # the mpich wheel's, in this environment
    return str(local) if local.exists() else shutil.which("mpiexec")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_mpi_ranks_equal_single_process(ranks):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec")
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            [mpiexec, "-n", str(ranks), sys.executable, str(WORKER)],
            capture_output=True,
            text=True,
            timeout=300,  # a hang is a failure, not a stuck CI run
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {ranks} did not finish in 300 s: {exc.stdout}\n{exc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    results = dict(enumerate(json.loads(lines[0].removeprefix("RESULTS "))))
    assert sorted(results) == list(range(ranks)), proc.stdout + proc.stderr
    for rank, summary in results.items():
        assert not summary["failed"], f"rank {rank}:\n" + "\n".join(summary["failed"])
        assert summary["passed"] >= 28, summary
    assert proc.returncode == 0, proc.stderr
    # Every rank sends the same number of bytes (the ring and the all-to-all are symmetric).
    assert len({json.dumps(s["bytes"], sort_keys=True) for s in results.values()}) == 1


# -- the ring's block plan -----------------------------------------------------------------------


def _keep(lq, lk, causal):
    offset = glue._offset(causal, lq, lk)
    if offset is None:
        return np.ones((lq, lk), dtype=bool)
    return np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset


def _covered(plan_calls, qsegs, ksegs, nq, nk, lq, lk):
    """The gathered (Lq, Lk) pairs the calls attend, counted (each must be 0 or 1)."""
    count = np.zeros((lq, lk), dtype=int)
    qpos = np.concatenate([np.arange(g, g + m) for g, _, m in qsegs])
    kpos = np.concatenate([np.arange(g, g + m) for g, _, m in ksegs])
    for q0, q1, k0, k1, mode in plan_calls:
        block = np.ones((q1 - q0, k1 - k0), dtype=bool)
        if mode is not None:
            block = _keep(q1 - q0, k1 - k0, mode)
        rows, cols = np.nonzero(block)
        np.add.at(count, (qpos[q0 + rows], kpos[k0 + cols]), 1)
    return count


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_ring_plan_covers_the_mask_exactly_once(layout, causal):
    for size, nq, nk in itertools.product((1, 2, 3, 4), (2, 4, 6), (2, 4, 8)):
        lq, lk = size * nq, size * nk
        want = _keep(lq, lk, causal).astype(int)
        total = np.zeros((lq, lk), dtype=int)
        for r in range(size):
            plan = glue._RingPlan(_ring_options(_FakeComm(r, size), layout, causal), nq, nk)
            qsegs = glue._segments(layout, r, size, nq)
            for s, calls in plan.calls.items():
                ksegs = glue._segments(layout, s, size, nk)
                total += _covered(calls, qsegs, ksegs, nq, nk, lq, lk)
                assert all(mode in (None, "bottom_right", "top_left") for *_, mode in calls)
        np.testing.assert_array_equal(total, want, err_msg=f"P={size} nq={nq} nk={nk}")


def test_zigzag_balances_causal_work():
    """Every rank attends the same number of (query, key) pairs under zigzag, not contiguous."""
    size, n = 4, 8

    def work(layout):
        per_rank = []
        for r in range(size):
            plan = glue._RingPlan(_ring_options(_FakeComm(r, size), layout, "top_left"), n, n)
            pairs = 0
            for calls in plan.calls.values():
                for q0, q1, k0, k1, mode in calls:
                    pairs += int(_keep(q1 - q0, k1 - k0, mode or None).sum())
            per_rank.append(pairs)
        return per_rank

    assert len(set(work("zigzag"))) == 1
    assert len(set(work("contiguous"))) == size


class _FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def _ring_options(comm, layout, causal):
    causal = {False: None, True: "top_left"}.get(causal, causal)
    return glue.RingOptions(comm=comm, causal=causal, scale=1.0, gqa_groups=1, layout=layout)


# -- shards and the in-process contract ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(rng, layout):
    x = rng.standard_normal((2, 3, 24, 5))
    for size in (1, 2, 3, 4):
        parts = [shard(x, r, size, layout=layout) for r in range(size)]
        assert all(p.shape == (2, 3, 24 // size, 5) for p in parts)
        np.testing.assert_array_equal(unshard(parts, layout=layout), x)
    assert not np.shares_memory(shard(x, 0, 1), x)
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard(x[..., :20, :], 0, 4, layout="zigzag")
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < size"):
        shard(x, 3, 3)


def test_single_rank_in_process_and_protocol(rng):
    from mpi4py import MPI

    import arrayattn as aa

    q, k, v = (rng.standard_normal((2, 4, 12, 6)) for _ in range(3))
    for op in (ring_attention, ulysses_attention):
        out, res = op.fwd(q, k, v, comm=MPI.COMM_SELF, causal=True)
        g = op.bwd(res, np.ones_like(out))
        want, wres = aa.scaled_dot_product_attention.fwd(q, k, v, causal=True)
        wg = aa.scaled_dot_product_attention.bwd(wres, np.ones_like(want))
        np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
        for a, b in zip(g, wg[:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
        assert op.name not in aa.registered_ops()  # a communicator cannot go through adapters
        assert pickle.loads(pickle.dumps(op)) is op
    with pytest.raises(TypeError, match="comm: expected an mpi4py intracommunicator"):
        ring_attention(q, k, v, comm=object())
    with pytest.raises(ValueError, match="layout: expected one of"):
        ring_attention(q, k, v, comm=MPI.COMM_SELF, layout="striped")
    with pytest.raises(ValueError, match="ulysses_attention splits the heads"):
        ulysses_attention(q[0, 0], k[0, 0], v[0, 0], comm=MPI.COMM_SELF)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="takes NumPy"):
        ring_attention(*(torch.from_numpy(x) for x in (q, k, v)), comm=MPI.COMM_SELF)


def test_ring_one_rank_runs_one_block_and_sends_nothing(rng):
    """With one rank the ring is plain attention: one SDPA call per pass, no message."""
    from mpi4py import MPI

    q, k, v = (rng.standard_normal((1, 2, 16, 4)) for _ in range(3))
    with glue._tracing() as events:
        out, res = ring_attention.fwd(q, k, v, comm=MPI.COMM_SELF, causal=True)
        ring_attention.bwd(res, np.ones_like(out))
    assert [e["kind"] for e in events] == ["compute", "compute"]
    plan = glue._RingPlan(_ring_options(_FakeComm(0, 1), "contiguous", "top_left"), 16, 16)
    assert plan.calls == {0: [(0, 16, 0, 16, "top_left")]}  # exactly SDPA's causal=True call


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(dist, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

"""Communication of ring and all-to-all attention: bytes per rank, and how much is hidden.

    mpiexec -n 2 python asv_benches/ring_comm.py [--length 8192] [--heads 8] [--repeat 3]

Per rank and per pass (forward, backward): the bytes sent, counted by the ops' own trace and
compared with the formulas of docs/scaling.rst; and for ring attention the fraction of
communication hidden behind computation, from timestamps: for every exchange of a step,
``comm = done - posted`` (requests posted until a helper thread saw them complete) and
``exposed = max(0, done - waited)`` (how long the main thread still waited once its compute was
over); hidden = ``1 - Σ exposed / Σ comm``. For scale, the same bytes through a blocking
``Sendrecv`` with nothing else running. Set NUMBA_NUM_THREADS so that ranks × threads fits the
cores; on fewer cores than ranks plus helper threads the figures mix in oversubscription.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

from arrayattn._glue.distributed import _tracing
from arrayattn.distributed import ring_attention, shard, ulysses_attention

COMM = MPI.COMM_WORLD
RANK, P = COMM.Get_rank(), COMM.Get_size()


def _sendrecv_seconds(nbytes: int, repeat: int) -> float:
    buf = np.ones(nbytes, dtype=np.uint8)
    got = np.empty_like(buf)
    times = []
    for _ in range(repeat):
        COMM.Barrier()
        start = time.perf_counter()
        COMM.Sendrecv(buf, (RANK + 1) % P, 7, got, (RANK - 1) % P, 7)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(op, arrays, dout, repeat, **kwargs):
    runs = []
    for _ in range(repeat):
        COMM.Barrier()
        with _tracing() as events:
            t0 = time.perf_counter()
            out, res = op.fwd(*arrays, comm=COMM, **kwargs)
            t1 = time.perf_counter()
            op.bwd(res, dout)
            t2 = time.perf_counter()
        runs.append((events, t1 - t0, t2 - t1))
    return runs


def _summary(events):
    sent: dict[str, int] = {}
    comm = exposed = 0.0
    for e in events:
        if e["kind"] == "send":
            sent[e["phase"]] = sent.get(e["phase"], 0) + e["nbytes"]
        elif e["kind"] == "exchange":
            comm += e["done"] - e["posted"]
            exposed += max(0.0, e["done"] - e["waited"])
    return sent, comm, exposed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.length, args.dim)
    full = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    item = 4
    n = args.length // P
    kv_elems = args.heads * n * 2 * args.dim  # k and v shards of this rank
    lines = []
    for name, op, kwargs in (
        ("ring", ring_attention, {"layout": "contiguous"}),
        ("ring causal zigzag", ring_attention, {"layout": "zigzag", "causal": True}),
        ("ulysses", ulysses_attention, {}),
    ):
        layout = kwargs.get("layout", "contiguous")
        mine = [shard(x, RANK, P, layout=layout) for x in full]
        op.fwd(*mine[:3], comm=COMM, **kwargs)  # warm-up (JIT cache, first touch)
        runs = _measure(op, mine[:3], mine[3], args.repeat, **kwargs)
        sent, _, _ = _summary(runs[0][0])
        if op is ring_attention:
            formula = {
                "forward": (P - 1) * kv_elems * item,
                "backward": (P - 1) * kv_elems * item + (P * kv_elems * item if P > 1 else 0),
            }
            counted = {
                "forward": sent.get("forward", 0),
                "backward": sent.get("backward", 0) + sent.get("gradients", 0),
            }
        else:
            shard_elems = args.heads * n * args.dim  # q, k, v, out, dout, dq, ... all alike
            formula = {"forward": (P - 1) * 4 * shard_elems * item // P}
            formula["backward"] = formula["forward"]
            counted = {"forward": sent.get("forward", 0), "backward": sent.get("backward", 0)}
        hidden = []
        for events, _, _ in runs:
            _, comm, exposed = _summary(events)
            if comm > 0:
                hidden.append(1 - exposed / comm)
        fwd = statistics.median(r[1] for r in runs)
        bwd = statistics.median(r[2] for r in runs)
        comm_med = statistics.median(_summary(r[0])[1] for r in runs)
        exposed_med = statistics.median(_summary(r[0])[2] for r in runs)
        line = (
            f"rank {RANK} {name:20s} fwd {fwd:.3f} s bwd {bwd:.3f} s | bytes sent fwd "
            f"{counted['forward']:,} (formula {formula['forward']:,}) bwd "
            f"{counted['backward']:,} (formula {formula['backward']:,})"
        )
        if hidden:
            line += (
                f" | comm {comm_med * 1e3:.1f} ms, exposed {exposed_med * 1e3:.1f} ms, hidden "
                f"{statistics.median(hidden):.2f} [{min(hidden):.2f}, {max(hidden):.2f}]"
            )
        lines.append(line)
    block = kv_elems * item
    lines.append(
        f"rank {RANK} blocking Sendrecv of one K/V block ({block:,} bytes), nothing else running: "
        f"{_sendrecv_seconds(block, 5) * 1e3:.1f} ms"
    )
    gathered = COMM.gather(lines, root=0)
    if RANK == 0:
        print(f"P = {P}, (B, H, L, d) = {shape} float32, median of {args.repeat}")
        for rank_lines in gathered:
            print("\n".join(rank_lines))


if __name__ == "__main__":
    main()

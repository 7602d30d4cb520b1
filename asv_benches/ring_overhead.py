"""Ring attention on one rank against plain scaled_dot_product_attention, forward + backward.

    python asv_benches/ring_overhead.py [--length 8192] [--heads 4] [--repeat 7] [--pairs 3]

Each side runs in a worker process of its own (spawned, so neither shares a Numba or BLAS thread
pool with the other); the driver alternates single calls between them after a warm-up, and
reports the median of each and the ratio of medians. ``ring_attention`` runs on
``MPI.COMM_SELF`` (no mpiexec needed): one block, no message, so the ratio is the ring's own
overhead (validation, residual bookkeeping, the gradient accumulators). Timings of one kernel
differ between fresh processes by several percent, so ``--pairs`` fresh pairs of workers are
measured and every pair's ratio is printed; ``--mpi-both`` makes the SDPA worker initialise MPI
too (to tell MPI's effect on the process from the ring's own cost).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time


def _worker(side: str, shape: tuple[int, ...], causal: bool, mpi_both: bool, conn) -> None:
    import numpy as np

    if mpi_both:
        from mpi4py import MPI  # noqa: F401

    import arrayattn as aa

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    dout = rng.standard_normal(shape, dtype=np.float32)
    if side == "sdpa":
        op, kwargs = aa.scaled_dot_product_attention, {}
    else:
        from mpi4py import MPI

        from arrayattn.distributed import ring_attention

        op, kwargs = ring_attention, {"comm": MPI.COMM_SELF}

    def run():
        out, res = op.fwd(q, k, v, causal=causal, **kwargs)
        return op.bwd(res, dout)

    run()  # JIT load, first touch
    conn.send("ready")
    while conn.recv() == "go":
        start = time.perf_counter()
        run()
        conn.send(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--mpi-both", action="store_true")
    args = parser.parse_args()
    shape = (1, args.heads, args.length, args.dim)
    ctx = mp.get_context("spawn")
    print(f"forward+backward, float32, (B, H, L, d) = {shape}, median of {args.repeat}")
    for causal in (False, True):
        for pair in range(args.pairs):
            pipes, procs = {}, []
            for side in ("sdpa", "ring"):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(side, shape, causal, args.mpi_both, child))
                p.start()
                pipes[side] = parent
                procs.append(p)
            for conn in pipes.values():
                assert conn.recv() == "ready"
            times = {side: [] for side in pipes}
            for _ in range(args.repeat):
                for side, conn in pipes.items():  # alternate: drift hits both sides alike
                    time.sleep(0.2)  # let the other worker's threads go idle
                    conn.send("go")
                    times[side].append(conn.recv())
            for conn in pipes.values():
                conn.send("stop")
            for p in procs:
                p.join()
            med = {side: statistics.median(t) for side, t in times.items()}
            lo = {side: min(t) for side, t in times.items()}
            hi = {side: max(t) for side, t in times.items()}
            print(
                f"causal={causal!s:5} pair {pair}  sdpa {med['sdpa']:.3f} s "
                f"[{lo['sdpa']:.3f}, {hi['sdpa']:.3f}]  ring(1 rank) {med['ring']:.3f} s "
                f"[{lo['ring']:.3f}, {hi['ring']:.3f}]  ratio {med['ring'] / med['sdpa']:.3f}"
            )


if __name__ == "__main__":
    main()

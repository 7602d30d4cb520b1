"""
Ring attention on two MPI ranks
===============================

:func:`arrayattn.distributed.ring_attention` splits one sequence over the ranks of an MPI
communicator: each rank holds a shard of ``q``, ``k`` and ``v``, the key/value blocks travel once
around the ring, and every rank ends up with its shard of exactly the attention output (and, from
``.bwd``, of the gradients). The program below is what each rank runs; here it is launched with
``mpiexec -n 2`` (the ``mpich`` wheel of the ``arrayattn[distributed]`` extra provides it), and
rank 0 compares the gathered result with single-process attention.

See :doc:`../scaling` for when to use the ring, the all-to-all variant or Dask, and what each
costs in communication.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from arrayattn.distributed import shard

PROGRAM = r"""
import numpy as np
from mpi4py import MPI

import arrayattn as aa
from arrayattn.distributed import ring_attention, shard, unshard

comm = MPI.COMM_WORLD
rng = np.random.default_rng(0)             # the same seed everywhere: the same gathered arrays
q, k, v = rng.standard_normal((3, 1, 4, 512, 64))   # (N, H, L, d) gathered, float64
dout = rng.standard_normal(q.shape)

# This rank's shards: chunks r and 2P-1-r of 2P (zigzag balances causal work).
mine = [shard(x, comm.rank, comm.size, layout="zigzag") for x in (q, k, v, dout)]
out, res = ring_attention.fwd(*mine[:3], comm=comm, causal=True, layout="zigzag")
grads = ring_attention.bwd(res, mine[3])             # this rank's dq, dk, dv shards

outs, dks = comm.gather(out), comm.gather(grads.k)
if comm.rank == 0:
    want, wres = aa.scaled_dot_product_attention.fwd(q, k, v, causal=True)
    wg = aa.scaled_dot_product_attention.bwd(wres, dout)
    err = np.abs(unshard(outs, layout="zigzag") - want).max()
    gerr = np.abs(unshard(dks, layout="zigzag") - wg.k).max()
    print(f"{comm.size} ranks, shards of {out.shape[-2]} rows: max |out - single process| = "
          f"{err:.1e}, max |dk - single process| = {gerr:.1e}")
"""

mpiexec = Path(sys.executable).with_name("mpiexec")
mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
if mpiexec is None:
    print("no mpiexec here: pip install 'arrayattn[distributed]'")
else:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ring.py"
        script.write_text(PROGRAM)
        result = subprocess.run(
            [mpiexec, "-n", "2", sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
        )
    print(result.stdout.strip() or result.stderr[-2000:])

# %%
# Who computes what
# -----------------
# The rank that holds a query row attends it to every key; under a causal mask the pairs above
# the diagonal are skipped. With the contiguous layout rank 1 holds the later half of the
# sequence and does three times the work of rank 0; with the zigzag layout each rank holds one
# early and one late chunk, and the work is even.

L, P = 16, 2
fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), layout="constrained")
for ax, layout in zip(axes, ["contiguous", "zigzag"], strict=True):
    owner = np.empty(L, dtype=int)
    for rank in range(P):
        owner[shard(np.arange(L)[:, None], rank, P, layout=layout)[:, 0]] = rank
    causal = np.tril(np.ones((L, L), dtype=bool))
    picture = np.where(causal, owner[:, None], -1).astype(float)
    picture[picture < 0] = np.nan
    ax.imshow(picture, cmap="coolwarm", vmin=0, vmax=P - 1)
    work = [int((causal & (owner[:, None] == r)).sum()) for r in range(P)]
    ax.set_title(f"{layout}: pairs per rank {work}")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
plt.show()

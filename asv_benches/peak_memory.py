"""Peak *extra* memory of one scaled-dot-product-attention forward+backward, traced by tracemalloc.

Usage (one measurement per fresh process)::

    python asv_benches/peak_memory.py [--L 16384] [--H 1] [--d 64] [--dtype float32]
                                      [--backend auto|array_api|numba]

NumPy reports its array allocations to :mod:`tracemalloc`, so the traced peak during
``fwd`` + ``bwd`` is the memory the op allocated. From it we subtract what must exist anyway at the
end of a training step's attention — the output, the logsumexp and the gradients dq, dk, dv (the
inputs q, k, v, do exist before tracing starts and are not counted) — and report the rest as the
op's extra memory, next to the L×L float32 score matrix a dense implementation would hold. Memory
allocated outside NumPy's allocator (e.g. inside Numba-compiled code) is not traced; the maximum
resident set size is printed as a cross-check.
"""

from __future__ import annotations

import argparse
import resource
import tracemalloc

import numpy as np

import arrayattn as aa

MiB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=1)
    p.add_argument("--L", type=int, default=16384)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backend", default="auto")
    a = p.parse_args()

    rng = np.random.default_rng(0)
    shape = (a.B, a.H, a.L, a.d)
    q, k, v, do = (rng.standard_normal(shape, dtype=np.float32).astype(a.dtype) for _ in range(4))
    op = aa.scaled_dot_product_attention
    # A tiny call first, so that probing backends (``auto`` imports numba to see whether it
    # works), importing kernel modules and JIT compilation are not counted.
    with aa.use_backend(a.backend):
        tiny = q[..., :16, :]
        op.bwd(op.fwd(tiny, tiny, tiny, causal=a.causal)[1], do[..., :16, :])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    tracemalloc.start()
    with aa.use_backend(a.backend):
        out, res = op.fwd(q, k, v, causal=a.causal)
        g = op.bwd(res, do)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    lse = res.arrays["lse"]
    must = out.nbytes + lse.nbytes + g.q.nbytes + g.k.nbytes + g.v.nbytes
    extra = peak - must
    dense = a.B * a.H * a.L * a.L * np.dtype(a.dtype).itemsize
    one = q.nbytes  # one (B, H, L, d) array
    print(
        f"sdpa fwd+bwd B={a.B} H={a.H} L={a.L} d={a.d} {a.dtype} causal={a.causal} "
        f"setting={a.backend!r} ran on {res.backend!r}"
    )
    print(f"  traced peak            {peak / MiB:9.1f} MiB")
    print(f"  outputs + gradients    {must / MiB:9.1f} MiB  (out, lse, dq, dk, dv)")
    print(
        f"  extra (peak - those)   {extra / MiB:9.1f} MiB  = {extra / one:.1f} x one (B,H,L,d) "
        "array"
    )
    print(f"  dense L x L scores     {dense / MiB:9.1f} MiB  (for comparison)")
    print(
        f"  max RSS growth         {(rss1 - rss0) / MiB:9.1f} MiB  (cross-check, untraced memory "
        "too)"
    )


if __name__ == "__main__":
    main()

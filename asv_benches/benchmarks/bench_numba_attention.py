"""Numba SDPA kernel figures not in ``bench_attention``: L-scaling (causal and not) and the cold
first-call compile time (Numba cache directory empty).

``bench_attention`` already times forward, forward+backward, peak memory, GFLOP/s and the fraction
of sgemm for every CPU backend at L = 512 and 2048, and the first call with whatever cache exists.
"""

from __future__ import annotations

from ._common import build, median_seconds, require_backend


class NumbaSdpaScaling:
    """float32 forward+backward, B=1, H=8, d=64: cost must grow as L²."""

    param_names = ["L", "causal"]
    params = [[512, 1024, 2048, 4096, 8192], [0, 1]]
    timeout = 900
    number = 1
    repeat = (1, 5, 30.0)
    warmup_time = 0.0

    def setup(self, length, causal):
        require_backend("numba", "scaled_dot_product_attention")
        self.run = build(
            "sdpa",
            {"B": 1, "H": 8, "L": length, "d": 64, "causal": causal},
            "float32",
            "fwd_bwd",
            "numba",
        )  # called once: JIT compile / cache load

    def time_fwd_bwd(self, length, causal):
        self.run()

    def track_gflops_fwd_bwd(self, length, causal):
        flops = 3.5 * 4.0 * 8 * length * length * 64 / (2 if causal else 1)
        return flops / median_seconds(self.run, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"


class NumbaSdpaCompile:
    """First forward+backward in a fresh interpreter with an empty Numba cache (cold compile)."""

    timeout = 600
    repeat = (1, 3, 120.0)

    def setup(self):
        require_backend("numba", "scaled_dot_product_attention")

    def timeraw_cold_compile(self):
        return """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
import numpy as np, arrayattn as aa
q = np.random.default_rng(0).standard_normal((1, 8, 512, 64), dtype=np.float32)
with aa.use_backend("numba"):
    out, res = aa.scaled_dot_product_attention.fwd(q, q, q)
    aa.scaled_dot_product_attention.bwd(res, out)
"""

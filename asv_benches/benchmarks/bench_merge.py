"""merge_attention: combining P partial attention results (split-KV, one ring step per part).

Figures: ``time_fwd``, ``time_fwd_bwd`` and ``track_gbytes_per_s_fwd`` (the bytes the forward
must read and write, ``(P+1)·(B·H·L·dv + B·H·L)`` elements, over its time: the op is
memory-bound, so this is the figure to compare with the machine's memory bandwidth). The op has
only the array-API reference (NumPy here), so the suite is parametrized by dtype, the number of
parts and the length.
"""

from __future__ import annotations

import numpy as np

from ._common import median_seconds

_B, _H, _DV = 1, 8, 64


class MergeAttention:
    param_names = ["dtype", "parts", "L"]
    params = [["float32", "float64"], [2, 8], [2048, 8192]]
    timeout = 300
    number = 1
    repeat = (1, 10, 10.0)
    warmup_time = 0.0

    def setup(self, dtype, parts, length):
        import arrayattn as aa

        rng = np.random.default_rng(0)
        self.op = aa.merge_attention
        self.outs = tuple(
            rng.standard_normal((_B, _H, length, _DV)).astype(dtype) for _ in range(parts)
        )
        lse_dtype = np.float64 if dtype == "float64" else np.float32
        self.lses = tuple(
            rng.standard_normal((_B, _H, length)).astype(lse_dtype) for _ in range(parts)
        )
        self.dout = np.ones((_B, _H, length, _DV), dtype=dtype)
        itemsize = np.dtype(dtype).itemsize
        self.bytes_fwd = (parts + 1) * (
            _B * _H * length * (_DV * itemsize + np.dtype(lse_dtype).itemsize)
        )
        self.run_fwd()
        self.run_fwd_bwd()

    def run_fwd(self):
        return self.op(self.outs, self.lses)

    def run_fwd_bwd(self):
        out, res = self.op.fwd(self.outs, self.lses)
        return self.op.bwd(res, (self.dout, None))

    def time_fwd(self, dtype, parts, length):
        self.run_fwd()

    def time_fwd_bwd(self, dtype, parts, length):
        self.run_fwd_bwd()

    def track_gbytes_per_s_fwd(self, dtype, parts, length):
        return self.bytes_fwd / median_seconds(self.run_fwd, 5) / 1e9

    track_gbytes_per_s_fwd.unit = "GB/s"

"""Neighbourhood attention 2-D (NATTEN clamp) and HaloNet attention (inputs from
``cases_neighborhood``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd`` (peak RSS of the benchmark process),
``track_gflops_fwd_bwd`` (4·B·heads·H·W·K²·d FLOP forward — q·k and p·v over the window — and 2.5
times that backward). The ratio to the PyTorch gather (``na2d``) and unfold (``halo``)
implementations is reported by ``python -m arrayattn bench --case na2d`` / ``--case halo``, which
times each side in its own process. Unavailable backends are skipped (``NotImplementedError``).
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend


class _Local:
    case: str
    op: str
    param_names = ["backend", "dtype", "size"]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def _params(self, size):
        raise NotImplementedError

    def setup(self, backend, dtype, size):
        require_backend(backend, self.op)
        if backend == "array_api" and size != self.params[2][0]:
            raise NotImplementedError("the reference is timed at the smallest size only")
        p = self._params(size)
        from arrayattn._bench.cases import CASES

        self.flops = CASES[self.case].flops(p, "fwd_bwd")
        self.fwd = build(self.case, p, dtype, "fwd", backend)
        self.fwd_bwd = build(self.case, p, dtype, "fwd_bwd", backend)

    def time_fwd(self, backend, dtype, size):
        self.fwd()

    def time_fwd_bwd(self, backend, dtype, size):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, backend, dtype, size):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, backend, dtype, size):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"


class NeighborhoodAttention2D(_Local):
    """``neighborhood_attention_2d``, B=1, 4 heads, d=32, clamp; size = "HxW/K"."""

    case = "na2d"
    op = "neighborhood_attention_2d"
    params = [list(CPU_BACKENDS), list(DTYPES), ["32/7", "64/3", "64/7", "64/13", "128/7"]]

    def _params(self, size):
        hw, kernel = (int(s) for s in size.split("/"))
        return {"B": 1, "heads": 4, "H": hw, "W": hw, "d": 32, "K": kernel}


class HaloAttention(_Local):
    """``halo_attention``, B=1, 4 heads, d=32, block 8, halo 3; size = image side."""

    case = "halo"
    op = "halo_attention"
    params = [list(CPU_BACKENDS), list(DTYPES), [32, 64]]

    def _params(self, size):
        return {"B": 1, "heads": 4, "H": size, "W": size, "d": 32, "b": 8, "halo": 3}

"""Scaled dot-product attention and multi-head attention (inputs from ``cases_attention``).

Figures: ``time_fwd``, ``time_fwd_bwd``, ``peakmem_fwd_bwd`` (peak RSS of the benchmark process),
``track_gflops_fwd_bwd`` (FlashAttention's convention: 4·B·H·L²·d FLOP forward, 2.5 times that
backward), ``track_fraction_of_sgemm`` (that rate over the machine's sgemm rate, measured once per
class in ``setup_cache``) and ``timeraw_first_call`` (the first forward+backward in a fresh
interpreter: import-time kernel loading and JIT compilation, or loading Numba's on-disk cache).
A combination whose backend is unavailable here, has no kernel for the op, or declines the dtype
is skipped (``NotImplementedError`` in ``setup``).
"""

from __future__ import annotations

from ._common import CPU_BACKENDS, DTYPES, build, median_seconds, require_backend, sgemm_gflops

_SIZES = (512, 2048)


def _sdpa_params(length: int) -> dict:
    return {"B": 1, "H": 8, "L": length, "d": 64, "causal": 0}


def _mha_params(length: int) -> dict:
    return {"N": 1, "L": length, "E": 512, "heads": 8}  # 8 heads of width 64


class _Attention:
    """Shared by the SDPA and MHA suites; subclasses set ``case``, ``op`` and ``sizes``."""

    case: str
    op: str
    param_names = ["backend", "dtype", "L"]
    params = [list(CPU_BACKENDS), list(DTYPES), list(_SIZES)]
    timeout = 600
    # One call per sample (a call takes 10 ms to 1 s); at most 10 samples or about 20 s.
    number = 1
    repeat = (1, 10, 20.0)
    warmup_time = 0.0

    def _params(self, length: int) -> dict:
        raise NotImplementedError

    def setup_cache(self):
        return sgemm_gflops()

    def setup(self, sgemm, backend, dtype, length):
        require_backend(backend, self.op)
        p = self._params(length)
        self.flops = self.cases()[self.case].flops(p, "fwd_bwd")
        self.fwd = build(self.case, p, dtype, "fwd", backend)
        self.fwd_bwd = build(self.case, p, dtype, "fwd_bwd", backend)

    @staticmethod
    def cases():
        from arrayattn._bench.cases import CASES

        return CASES

    def time_fwd(self, sgemm, backend, dtype, length):
        self.fwd()

    def time_fwd_bwd(self, sgemm, backend, dtype, length):
        self.fwd_bwd()

    def peakmem_fwd_bwd(self, sgemm, backend, dtype, length):
        self.fwd_bwd()

    def track_gflops_fwd_bwd(self, sgemm, backend, dtype, length):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"

    def track_fraction_of_sgemm(self, sgemm, backend, dtype, length):
        return self.flops / median_seconds(self.fwd_bwd, 3) / 1e9 / sgemm

    track_fraction_of_sgemm.unit = "fraction of sgemm"


class SDPA(_Attention):
    """``scaled_dot_product_attention``, B=1, H=8, d=64, not causal."""

    case = "sdpa"
    op = "scaled_dot_product_attention"

    def _params(self, length):
        return _sdpa_params(length)


class MHA(_Attention):
    """``multi_head_attention``, self-attention, N=1, E=512, 8 heads, with biases."""

    case = "mha"
    op = "multi_head_attention"

    def _params(self, length):
        return _mha_params(length)


class _FirstCall:
    """The first forward+backward in a fresh interpreter (asv ``timeraw_``), L=512."""

    case: str
    op: str
    param_names = ["backend", "dtype"]
    params = [list(CPU_BACKENDS), list(DTYPES)]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup(self, backend, dtype):
        require_backend(backend, self.op)

    def timeraw_first_call(self, backend, dtype):
        params = self._params(512)
        setup = f"""
import arrayattn as aa
from arrayattn._bench.cases import CASES
aa.set_backend({backend!r})
run = CASES[{self.case!r}].arrayattn({params!r}, {dtype!r}, "fwd_bwd")
"""
        return "run()", setup


class SDPAFirstCall(_FirstCall):
    case = "sdpa"
    op = "scaled_dot_product_attention"

    def _params(self, length):
        return _sdpa_params(length)


class MHAFirstCall(_FirstCall):
    case = "mha"
    op = "multi_head_attention"

    def _params(self, length):
        return _mha_params(length)

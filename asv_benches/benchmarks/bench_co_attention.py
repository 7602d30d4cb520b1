"""COSNet co-attention, CoDA and CAN cross attention: forward and forward+backward times.

``CoAttention``: ``co_attention`` and ``cross_attention_fewshot`` at the papers' feature-map sizes
and a small batch, no PyTorch comparison (the test-suite checks them against the official
semantics). ``co_attention`` is composite (its 'paper' mode runs two SDPA cores on the active
backend); ``cross_attention_fewshot`` runs on the array-API reference only.

``Cosnet`` and ``Coda``: ``co_attention`` and ``coda`` through the ``arrayattn._bench`` cases,
with ``track_time_over_torch`` against the official COSNet module and the CoDA paper's equations
in PyTorch (``torch.cdist(p=1)``).
"""

from __future__ import annotations

import numpy as np

from ._common import CPU_BACKENDS, _CaseBenchmark, require_backend


def _make(op_name: str, size: str):
    import arrayattn as aa
    from arrayattn._glue.co_attention import example_can_params, example_coattn_params

    rng = np.random.default_rng(0)

    def f32(t):
        return (
            {k: v.astype(np.float32) for k, v in t.items()}
            if isinstance(t, dict)
            else t.astype(np.float32)
        )  # noqa: E731

    if op_name == "co_attention":
        c, hw = (64, 16) if size == "small" else (256, 32)
        args = (
            rng.standard_normal((2, c, hw, hw)),
            rng.standard_normal((2, c, hw, hw)),
            example_coattn_params(rng, c),
        )
    else:
        n, c = (10, 64) if size == "small" else (75, 512)
        args = (
            rng.standard_normal((n, c, 6, 6)),
            rng.standard_normal((n, c, 6, 6)),
            example_can_params(rng, 36, 6),
        )
    return getattr(aa, op_name), tuple(f32(a) for a in args)


class CoAttention:
    param_names = ["op", "backend", "size"]
    params = [["co_attention", "cross_attention_fewshot"], list(CPU_BACKENDS), ["small", "paper"]]
    timeout = 600
    number = 1
    repeat = (1, 10, 20.0)

    def setup(self, op_name, backend, size):
        if backend != "array_api" and op_name != "co_attention":
            raise NotImplementedError(f"{op_name} has no {backend} kernel")
        require_backend(backend, "scaled_dot_product_attention")
        self.op, self.args = _make(op_name, size)
        self.backend = backend
        outs = self.run_fwd()
        self.cts = tuple(np.ones_like(o) for o in outs)
        self.run_fwd_bwd()  # warm up (JIT)

    def run_fwd(self):
        import arrayattn as aa

        with aa.use_backend(self.backend):
            return self.op(*self.args)

    def run_fwd_bwd(self):
        import arrayattn as aa

        with aa.use_backend(self.backend):
            _, res = self.op.fwd(*self.args)
            return self.op.bwd(res, self.cts)

    def time_fwd(self, op_name, backend, size):
        self.run_fwd()

    def time_fwd_bwd(self, op_name, backend, size):
        self.run_fwd_bwd()

    def peakmem_fwd_bwd(self, op_name, backend, size):
        self.run_fwd_bwd()


class Coda(_CaseBenchmark):
    """``coda`` vs the paper's equations in PyTorch; "paper": sentence-pair sizes (d = 300 word
    vectors), "long": one item of 1024 × 1024 positions (the one-item path of the numba kernel)."""

    case = "coda"
    op = "coda"
    sizes = {
        "small": {"N": 4, "La": 32, "Lb": 35, "d": 64, "k": 32},
        "paper": {"N": 8, "La": 128, "Lb": 128, "d": 300, "k": 150},
        "long": {"N": 1, "La": 1024, "Lb": 1024, "d": 300, "k": 150},
    }
    params = [list(CPU_BACKENDS), list(sizes)]


class Cosnet(_CaseBenchmark):
    """``co_attention`` ('paper') vs COSNet's ``CoattentionModel`` in PyTorch (same weights)."""

    case = "cosnet"
    op = "scaled_dot_product_attention"  # composite; large calls run their cores on this op
    sizes = {
        "small": {"N": 2, "C": 64, "H": 16, "W": 16},
        "paper": {"N": 2, "C": 256, "H": 32, "W": 32},
    }
    params = [list(CPU_BACKENDS), list(sizes)]

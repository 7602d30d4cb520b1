"""The ``numba`` kernel of sparse_attention (Sparse Transformer): its dense attention pair.

The block-sparse decomposition of :mod:`arrayattn._reference.sparse` (a band, a residue-regrouped
causal attention, per-block causal attention, gathered summary columns; merged by logsumexp) run
on this backend's FlashAttention kernels (:mod:`arrayattn.backends.numba.attention`) instead of the
array-API reference: every dense piece is a fused Numba tile loop, the rearrangements and the
merge are NumPy. Same residuals and the same backward identity (each part's backward with the
merged output and logsumexp).
"""

from __future__ import annotations

from arrayattn._kernel import Kernel

from ._blas import BLAS
from .attention import sdpa_backward, sdpa_forward

__all__ = ["KERNELS"]

# The sparse convention of arrayattn._glue.sparse: this backend's dense attention pair, which the
# glue runs on every piece of the decomposition.
KERNELS = {"sparse_attention": Kernel(sdpa_forward, sdpa_backward, requires=(BLAS,))}

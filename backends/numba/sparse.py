"""The ``numba`` kernel of sparse_attention (Sparse Transformer).

The block-sparse decomposition of :mod:`arrayattn._reference.sparse` (a band, a residue-regrouped
causal attention, per-block causal attention, gathered summary columns; merged by logsumexp) run
on this backend's FlashAttention kernels (:mod:`arrayattn.backends.numba.attention`) instead of the
array-API reference: every dense piece is a fused Numba tile loop, the rearrangements and the
merge are NumPy. Same residuals and the same backward identity (each part's backward with the
merged output and logsumexp).
"""

from __future__ import annotations

from arrayattn._kernel import Kernel
from arrayattn._reference.sparse import sparse_backward, sparse_forward

from .attention import sdpa_backward as _nb_backward
from .attention import sdpa_forward as _nb_forward

__all__ = ["KERNELS"]


def _forward(xp, q, k, v, **kw):
    return _nb_forward(q, k, v, **kw)


def _backward(xp, q, k, v, out, lse, dout, dlse=None, **kw):
    return _nb_backward(q, k, v, out, lse, dout, dlse, **kw)


_ATTENTION = (_forward, _backward)


def _fwd(xp, arrays, options, save):
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    out, lse = sparse_forward(
        xp,
        q,
        k,
        v,
        heads=list(options.heads),
        stride=options.stride,
        scale=options.scale,
        attention=_ATTENTION,
    )
    return (out,), ({"q": q, "k": k, "v": v, "out": out, "lse": lse} if save else {})


def _bwd(xp, saved, options, cotangents):
    dq, dk, dv = sparse_backward(
        xp,
        saved["q"],
        saved["k"],
        saved["v"],
        saved["out"],
        saved["lse"],
        cotangents[0],
        heads=list(options.heads),
        stride=options.stride,
        scale=options.scale,
        attention=_ATTENTION,
    )
    return {"q": dq, "k": dk, "v": dv}


KERNELS = {"sparse_attention": Kernel(_fwd, _bwd)}

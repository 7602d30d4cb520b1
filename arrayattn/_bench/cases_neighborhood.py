"""Benchmark cases of neighbourhood attention (2-D, NATTEN clamp) and HaloNet attention.

The PyTorch comparisons are the straightforward implementations a user would write:

* ``na2d``: gather the ``K×K`` neighbours of every pixel with precomputed indices (an index
  table ``(H·W, K²)`` built once), dense softmax over the window, autograd backward.
* ``halo``: timm's ``HaloAttn`` core — zero-pad keys/values by the halo, ``unfold`` the
  ``(b+2h)²`` windows with stride ``b``, a batched matmul per block, autograd backward.
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES"]


def _rng():
    return np.random.default_rng(0)


def _inputs(p: dict, dtype: str):
    rng = _rng()
    shape = (p["B"], p["heads"], p["H"], p["W"], p["d"])
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4)]


def _na2d_flops(p: dict, mode: str) -> float:
    # q·k and p·v over the K² window: 4·B·heads·H·W·K²·d forward; backward 2.5x forward
    # (recomputed q·k, dout·v, dq, dk, dv).
    fwd = 4.0 * p["B"] * p["heads"] * p["H"] * p["W"] * p["K"] ** 2 * p["d"]
    return fwd if mode == "fwd" else 3.5 * fwd


def _na2d_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _inputs(p, dtype)
    op = aa.neighborhood_attention_2d
    kw = {"kernel_size": p["K"], "boundary": "clamp"}
    if mode == "fwd":
        return lambda: op(q, k, v, **kw)

    def run():
        out, res = op.fwd(q, k, v, **kw)
        return op.bwd(res, do)

    return run


def na2d_torch_gather_indices(h: int, w: int, kernel: int) -> np.ndarray:
    """(H·W, K²) flat key indices of NATTEN's clamped windows (dilation 1)."""

    def starts(n):
        return np.clip(np.arange(n) - kernel // 2, 0, n - kernel)

    ys = starts(h)[:, None] + np.arange(kernel)[None, :]  # (H, K)
    xs = starts(w)[:, None] + np.arange(kernel)[None, :]  # (W, K)
    idx = ys[:, None, :, None] * w + xs[None, :, None, :]  # (H, W, K, K)
    return idx.reshape(h * w, kernel * kernel)


def _na2d_torch(p: dict, dtype: str, mode: str):
    import torch

    q, k, v, do = (torch.from_numpy(a) for a in _inputs(p, dtype))
    b, heads, h, w, d = q.shape
    idx = torch.from_numpy(na2d_torch_gather_indices(h, w, p["K"])).reshape(-1)
    scale = d**-0.5

    def forward(q, k, v):
        qf, kf, vf = (t.reshape(b, heads, h * w, -1) for t in (q, k, v))
        kg = kf[:, :, idx].reshape(b, heads, h * w, -1, d)  # (B, h, HW, K², d)
        vg = vf[:, :, idx].reshape(b, heads, h * w, -1, vf.shape[-1])
        logits = torch.einsum("bhnd,bhnkd->bhnk", qf, kg) * scale
        probs = torch.softmax(logits, dim=-1)
        return torch.einsum("bhnk,bhnkd->bhnd", probs, vg).reshape(b, heads, h, w, -1)

    return torch_runner(lambda: forward(q, k, v), (q, k, v), do, mode)


# -- HaloNet ---------------------------------------------------------------------------------------


def _halo_flops(p: dict, mode: str) -> float:
    win = p["b"] + 2 * p["halo"]
    fwd = 4.0 * p["B"] * p["heads"] * p["H"] * p["W"] * win * win * p["d"]
    return fwd if mode == "fwd" else 3.5 * fwd


def _halo_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    q, k, v, do = _inputs(p, dtype)
    op = aa.halo_attention
    kw = {"block_size": p["b"], "halo_size": p["halo"]}
    if mode == "fwd":
        return lambda: op(q, k, v, **kw)

    def run():
        out, res = op.fwd(q, k, v, **kw)
        return op.bwd(res, do)

    return run


def _halo_torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    q, k, v, do = (torch.from_numpy(a) for a in _inputs(p, dtype))
    bsz, heads, h, w, d = q.shape
    blk, halo = p["b"], p["halo"]
    win = blk + 2 * halo
    scale = d**-0.5

    def forward(q, k, v):
        # timm HaloAttn core on (B·heads, d, H, W) maps
        def chw(t):
            return t.reshape(bsz * heads, h, w, -1).permute(0, 3, 1, 2)

        qc, kc, vc = chw(q), chw(k), chw(v)
        nb = (h // blk) * (w // blk)
        qb = qc.reshape(-1, d, h // blk, blk, w // blk, blk).permute(0, 2, 4, 3, 5, 1)
        qb = qb.reshape(bsz * heads, nb, blk * blk, d)
        kv = torch.cat([kc, vc], dim=1)
        kv = F.pad(kv, [halo, halo, halo, halo])
        kv = kv.unfold(2, win, blk).unfold(3, win, blk).reshape(bsz * heads, 2 * d, nb, -1)
        kv = kv.permute(0, 2, 3, 1)
        kb, vb = torch.split(kv, [d, d], dim=-1)
        attn = torch.softmax((qb @ kb.transpose(-1, -2)) * scale, dim=-1)
        out = attn @ vb  # (B·heads, nb, b², d)
        out = out.reshape(-1, h // blk, w // blk, blk, blk, d).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(bsz, heads, h, w, d)

    return torch_runner(lambda: forward(q, k, v), (q, k, v), do, mode)


CASES: dict[str, Case] = {
    "na2d": Case(
        "na2d",
        {"B": 1, "heads": 4, "H": 64, "W": 64, "d": 32, "K": 7},
        _na2d_flops,
        _na2d_arrayattn,
        _na2d_torch,
    ),
    "halo": Case(
        "halo",
        {"B": 1, "heads": 4, "H": 64, "W": 64, "d": 32, "b": 8, "halo": 3},
        _halo_flops,
        _halo_arrayattn,
        _halo_torch,
    ),
}

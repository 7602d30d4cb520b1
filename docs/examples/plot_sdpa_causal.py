"""
Causal attention probabilities, reconstructed from the logsumexp
================================================================

:func:`arrayattn.scaled_dot_product_attention` never builds the L×L probability matrix: it keeps
the per-row logsumexp ``lse`` (``return_lse=True``) and the backward pass recomputes
``P = exp(scale·q kᵀ − lse)`` tile by tile. Here we do that reconstruction once, densely, for a
tiny input, and plot it for the two causal alignments (``'top_left'``, PyTorch's default, and
``'bottom_right'``, FlashAttention's) when there are fewer queries than keys.
"""

import matplotlib.pyplot as plt
import numpy as np

import arrayattn as aa

rng = np.random.default_rng(0)
Lq, Lk, d = 6, 10, 8
q = rng.standard_normal((Lq, d))
k = rng.standard_normal((Lk, d))
v = rng.standard_normal((Lk, d))
scale = 1 / np.sqrt(d)

# %%
# Forward with the logsumexp, then ``P = exp(s − lse)`` with the causal mask applied to ``s``.
# Each reconstructed row sums to one, and ``P v`` is the op's output.

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
for ax, causal in zip(axes, ["top_left", "bottom_right"], strict=True):
    out, lse = aa.scaled_dot_product_attention(q, k, v, causal=causal, return_lse=True)
    offset = 0 if causal == "top_left" else Lk - Lq
    keep = np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + offset
    s = np.where(keep, scale * q @ k.T, -np.inf)
    p = np.exp(s - lse[:, None])
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p @ v, out)
    im = ax.imshow(p, cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"causal={causal!r}")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
fig.colorbar(im, ax=axes, shrink=0.8, label="probability")
plt.show()

# %%
# With ``'top_left'`` query *i* sees keys *j ≤ i*; with ``'bottom_right'`` it sees
# *j ≤ i + Lk − Lq*, so the last query sees every key. The two agree when ``Lq == Lk``.

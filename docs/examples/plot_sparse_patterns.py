"""
Sparse Transformer patterns
===========================

The factorised patterns of :func:`arrayattn.sparse_attention` as produced by
:func:`arrayattn.sparse_attention_mask`, for L = 48: ``'strided'`` (stride l = 6, local band of
l + 1 as in the paper, or l as in openai's code) and ``'fixed'`` (block length l = 8, summary
width c = 2, and the per-head summary sub-blocks of ``combine='multihead'``). Row i lists the keys
query i attends to. The op never builds these masks; it equals dense masked attention with them.
"""

import matplotlib.pyplot as plt
import numpy as np

import arrayattn as aa

L = 48
panels = [
    ("strided, merged", aa.sparse_attention_mask(L, pattern="strided", stride=6)),
    (
        "strided, A1 (band l+1)",
        aa.sparse_attention_mask(L, pattern="strided", stride=6, combine="interleaved", layer=0),
    ),
    (
        "strided, A2",
        aa.sparse_attention_mask(L, pattern="strided", stride=6, combine="interleaved", layer=1),
    ),
    (
        "strided, local_width=l",
        aa.sparse_attention_mask(L, pattern="strided", stride=6, local_width=6),
    ),
    ("fixed, merged", aa.sparse_attention_mask(L, pattern="fixed", stride=8, summary=2)),
    (
        "fixed, multihead head 1",
        aa.sparse_attention_mask(
            L, pattern="fixed", stride=8, summary=2, combine="multihead", num_heads=2
        )[1],
    ),
]

fig, axes = plt.subplots(2, 3, figsize=(10, 7), layout="constrained")
for ax, (title, mask) in zip(axes.flat, panels, strict=True):
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    ax.set_title(f"{title}\n{mask.sum() / (L * (L + 1) / 2):.0%} of the causal pairs", fontsize=9)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")

# %%
# The block-sparse op agrees with dense masked attention:
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, L, 8)) for _ in range(3))
out = aa.sparse_attention(q, k, v, pattern="fixed", stride=8, summary=2)
ref = aa.scaled_dot_product_attention(q, k, v, mask=panels[4][1])
assert np.allclose(out, ref)
plt.show()

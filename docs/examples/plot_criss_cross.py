"""
Criss-cross attention: the keys of a pixel, and two recurrent steps
===================================================================

:func:`arrayattn.criss_cross_attention` lets each pixel attend to the ``H + W - 1`` pixels of its
row and column (itself once). Here we reconstruct the attention weights of one pixel from the op
(by differentiating the output with respect to one-hot values), and show how two steps of
:func:`arrayattn.criss_cross_block` (CCNet's recurrence, shared parameters) spread information
from one pixel to the whole map.
"""

import matplotlib.pyplot as plt
import numpy as np

import arrayattn as aa

rng = np.random.default_rng(0)
H, W, d = 9, 12, 4
q = rng.standard_normal((1, H, W, d))
k = rng.standard_normal((1, H, W, d))

# %%
# With the values set to the one-hot code of every pixel, ``out[u]`` *is* the row of attention
# weights of pixel ``u`` over all ``H·W`` pixels (zero outside its row and column).

v = np.eye(H * W).reshape(1, H, W, H * W)
out = aa.criss_cross_attention(q, k, v)
u = (4, 7)
weights = out[0, u[0], u[1]].reshape(H, W)
assert np.isclose(weights.sum(), 1.0)
assert np.count_nonzero(weights) == H + W - 1

# %%
# Two recurrent steps: the gradient of one output pixel with respect to the input map is
# non-zero on the criss-cross of that pixel after one step and everywhere after two.

C = 8
params = {
    "w_q": rng.standard_normal((2, C, 1, 1)),
    "w_k": rng.standard_normal((2, C, 1, 1)),
    "w_v": rng.standard_normal((C, C, 1, 1)),
    "gamma": np.array([1.0]),
}
x = rng.standard_normal((1, C, H, W))
reach = []
for recurrence in (1, 2):
    y, res = aa.criss_cross_block.fwd(x, params, recurrence=recurrence)
    dy = np.zeros_like(y)
    dy[0, :, u[0], u[1]] = 1.0
    g = aa.criss_cross_block.bwd(res, dy)
    reach.append(np.abs(g.x[0]).sum(axis=0))

fig, axes = plt.subplots(1, 3, figsize=(10, 3), layout="constrained")
axes[0].imshow(weights, cmap="viridis")
axes[0].set_title(f"weights of pixel {u}")
for ax, r, n in zip(axes[1:], reach, (1, 2), strict=True):
    ax.imshow(np.log10(r + 1e-12), cmap="magma")
    ax.set_title(f"log10 |d y_u / d x|, R = {n}")
for ax in axes:
    ax.plot(u[1], u[0], "c+", ms=12)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

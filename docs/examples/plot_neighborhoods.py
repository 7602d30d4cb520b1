"""
Which keys a border query sees: clamp, zero and mask windows
============================================================

:func:`arrayattn.neighborhood_attention_2d` has three boundary rules. For a query near the
top-left corner of an 11×11 image with ``kernel_size=5``:

* ``'clamp'`` (NATTEN) shifts the window inward: always 5×5 keys inside the image;
* ``'zero'`` (SASA, timm) keeps the window centred; the part outside the image is zero keys and
  values that still take part in the softmax (drawn hatched);
* ``'mask'`` keeps the window centred and drops the outside keys.

The bottom row shows the same with ``dilation=2``. The windows are read off the op itself: with
values equal to one-hot position codes and equal logits, the output of a query is the uniform
average of the one-hot codes of the keys it sees.
"""

import matplotlib.pyplot as plt
import numpy as np

import arrayattn as aa

H = W = 11
K = 5
query = (1, 2)

# %%
# Keys are zero (so every logit is 0 and the softmax is uniform), values are one-hot codes of
# the pixel positions: ``out[query]`` is then 1/count at the pixels in the window.

q = np.zeros((H, W, 1))
k = np.zeros((H, W, 1))
v = np.eye(H * W).reshape(H, W, H * W)

fig, axes = plt.subplots(2, 3, figsize=(9, 6.4), layout="constrained")
for row, dil in enumerate((1, 2)):
    for ax, boundary in zip(axes[row], ("clamp", "zero", "mask"), strict=True):
        out = aa.neighborhood_attention_2d(q, k, v, kernel_size=K, dilation=dil, boundary=boundary)
        weights = out[query].reshape(H, W)
        ax.imshow(weights > 0, cmap="Blues", vmin=0, vmax=1.6)
        # padded keys in 'zero' mode: the centred window's out-of-image part
        if boundary == "zero":
            for dy in range(-(K // 2), K - K // 2):
                for dx in range(-(K // 2), K - K // 2):
                    y, x = query[0] + dy * dil, query[1] + dx * dil
                    if not (0 <= y < H and 0 <= x < W):
                        ax.add_patch(
                            plt.Rectangle(
                                (x - 0.5, y - 0.5),
                                1,
                                1,
                                fill=False,
                                hatch="///",
                                edgecolor="tab:red",
                            )
                        )
            ax.set_xlim(-3.5, W - 0.5)
            ax.set_ylim(H - 0.5, -3.5)
        ax.plot(query[1], query[0], "o", color="tab:orange", markersize=10)
        n_keys = int(np.sum(weights > 0))
        ax.set_title(f"{boundary}, dilation {dil}: {n_keys} image keys")
        ax.set_xticks(range(W))
        ax.set_yticks(range(H))
        ax.grid(False)
fig.suptitle(f"Keys seen by the query at {query} (orange), kernel_size={K}")
plt.show()

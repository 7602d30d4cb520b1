"""
CBAM attention maps on a synthetic image
========================================

:func:`arrayattn.cbam` multiplies a feature map by a channel gate ``M_c`` and then by a spatial
gate ``M_s``. The op returns only the gated features, so here we rebuild both maps from the
public primitives (:func:`arrayattn.linear`, :func:`arrayattn.relu`, :func:`arrayattn.sigmoid`,
:func:`arrayattn.conv2d`, ...) — a check that the block is what its formula says — and plot them
for a synthetic image: two bright blobs on a noisy background, seen through a few hand-made
filters.
"""

import matplotlib.pyplot as plt
import numpy as np

import arrayattn as aa

rng = np.random.default_rng(0)
H = W = 48
yy, xx = np.mgrid[0:H, 0:W] / H
image = np.exp(-((yy - 0.3) ** 2 + (xx - 0.3) ** 2) / 0.01) + 0.6 * np.exp(
    -((yy - 0.7) ** 2 + (xx - 0.65) ** 2) / 0.004
)
image += 0.05 * rng.standard_normal((H, W))

# %%
# Features: C = 8 channels from fixed 3×3 filters (identity, blurs, edges) and random ones,
# computed with the ``conv2d`` primitive.

C = 8
filters = np.zeros((C, 1, 3, 3))
filters[0, 0, 1, 1] = 1.0
filters[1, 0] = 1 / 9
filters[2, 0] = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
filters[3, 0] = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
filters[4:] = rng.standard_normal((4, 1, 3, 3)) / 3
x = aa.conv2d(image[None, None], filters, padding=1)  # (1, C, H, W)

# %%
# CBAM parameters: a shared MLP C → 4 → C and a 7×7 spatial kernel that smooths the
# channel-mean and responds to the channel-max (paper order ``[avg; max]``).

params = {
    "w1": 3 * rng.standard_normal((4, C)),
    "b1": np.full(4, 0.5),
    "w2": 2 * rng.standard_normal((C, 4)),
    "b2": np.zeros(C),
}
g = np.exp(-((np.arange(7) - 3) ** 2) / 4.0)
blur = np.outer(g, g) / np.outer(g, g).sum()
params["w_spatial"] = np.stack([4 * blur, 6 * blur])[None]  # (1, 2, 7, 7)
params["b_spatial"] = np.array([-2.0])
y = aa.cbam(x, params)

# %%
# The two maps from the primitives: ``M_c = σ(MLP(avg) + MLP(max))`` and
# ``M_s = σ(conv7×7([avg_c F'; max_c F']))``. Their product with ``x`` equals the op's output.


def mlp(z):
    return aa.linear(aa.relu(aa.linear(z, params["w1"], params["b1"])), params["w2"], params["b2"])


avg = aa.adaptive_avg_pool2d(x, 1)[..., 0, 0]
mx = aa.adaptive_max_pool2d(x, 1)[..., 0, 0]
m_c = aa.sigmoid(mlp(avg) + mlp(mx))  # (1, C)
f1 = x * m_c[:, :, None, None]
pooled = np.stack([f1.mean(axis=1), f1.max(axis=1)], axis=1)
m_s = aa.sigmoid(aa.conv2d(pooled, params["w_spatial"], params["b_spatial"], padding=3))
print("max |M_s · M_c · x − cbam(x)| =", float(np.max(np.abs(m_s * f1 - y))))

# %%
# Gradients flow through the same block: the gradient of the output energy with respect to
# the image-level features concentrates where the spatial gate is open.

out, res = aa.cbam.fwd(x, params)
grads = aa.cbam.bwd(res, out)  # d(½‖y‖²)/dx

fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
axes[0].imshow(image, cmap="gray")
axes[0].set_title("input image")
axes[1].bar(range(C), m_c[0])
axes[1].set_title("channel gate $M_c$")
axes[1].set_xlabel("channel")
im = axes[2].imshow(m_s[0, 0], cmap="magma", vmin=0, vmax=1)
axes[2].set_title("spatial gate $M_s$")
fig.colorbar(im, ax=axes[2], shrink=0.8)
axes[3].imshow(np.abs(grads.x[0]).sum(axis=0), cmap="viridis")
axes[3].set_title("|dL/dx| summed over channels, L = ½‖y‖²", fontsize=9)
for ax in axes[[0, 2, 3]]:
    ax.set_axis_off()
plt.show()

"""
A PyTorch CNN with SASA attention and CBAM, trained through ``arrayattn.torch``
================================================================================

:mod:`arrayattn.torch` turns every arrayattn op into a differentiable PyTorch op: the forward and
the hand-derived backward run on zero-copy NumPy views of the tensors (Numba where a kernel
exists), and autograd, optimisers and ``nn.Parameter`` work as usual.

Here a small CNN classifies synthetic 12×12 images by the orientation of a noisy bar
(horizontal, vertical, diagonal, anti-diagonal). Its second 3×3 convolution is replaced by
stand-alone self-attention over 3×3 neighbourhoods (:func:`arrayattn.sasa_block`, Ramachandran
et al. 2019), followed by a CBAM block (:func:`arrayattn.cbam`, Woo et al. 2018). The model is
trained on the CPU for a few hundred steps and the loss curve is plotted.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import arrayattn.torch as aat

torch.manual_seed(0)
torch.set_num_threads(1)
rng = np.random.default_rng(0)
SIZE, CLASSES = 12, 4


def make_batch(n):
    """Images with one bar of a random class's orientation at a random place, plus noise."""
    labels = rng.integers(0, CLASSES, n)
    images = 0.3 * rng.standard_normal((n, 1, SIZE, SIZE))
    t = np.arange(-3, 4)
    for i, c in enumerate(labels):
        y0, x0 = rng.integers(3, SIZE - 3, 2)
        dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][c]
        images[i, 0, y0 + dy * t, x0 + dx * t] += 1.0
    return torch.from_numpy(images).float(), torch.from_numpy(labels)


# %%
# The model
# ---------
# The SASA layer's projections and relative-position tables and the CBAM block's weights are
# ordinary ``nn.Parameter`` tensors, passed to the ops in ``params`` dicts with PyTorch layouts.


class SASA(nn.Module):
    """Drop-in replacement of a 3×3 ``Conv2d``: attention over each pixel's 3×3 window."""

    def __init__(self, c_in, c_out, heads=2, kernel_size=3):
        super().__init__()
        self.heads, self.kernel_size = heads, kernel_size
        dh = c_out // heads
        self.params = nn.ParameterDict(
            {
                "w_q": nn.Parameter(torch.randn(c_out, c_in, 1, 1) / c_in**0.5),
                "w_k": nn.Parameter(torch.randn(c_out, c_in, 1, 1) / c_in**0.5),
                "w_v": nn.Parameter(torch.randn(c_out, c_in, 1, 1) / c_in**0.5),
                "rel_h": nn.Parameter(0.1 * torch.randn(2 * kernel_size - 1, dh)),
                "rel_w": nn.Parameter(0.1 * torch.randn(2 * kernel_size - 1, dh)),
            }
        )

    def forward(self, x):
        return aat.sasa_block(
            x, dict(self.params), num_heads=self.heads, kernel_size=self.kernel_size
        )


class CBAM(nn.Module):
    def __init__(self, c, reduction=2, kernel_size=3):
        super().__init__()
        self.params = nn.ParameterDict(
            {
                "w1": nn.Parameter(torch.randn(c // reduction, c) / c**0.5),
                "w2": nn.Parameter(torch.randn(c, c // reduction) / (c // reduction) ** 0.5),
                "w_spatial": nn.Parameter(0.1 * torch.randn(1, 2, kernel_size, kernel_size)),
            }
        )

    def forward(self, x):
        return aat.cbam(x, dict(self.params))


model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.ReLU(),
    SASA(8, 8),  # was: nn.Conv2d(8, 8, 3, padding=1)
    nn.ReLU(),
    CBAM(8),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, CLASSES),
)
print(model)

# %%
# Training
# --------
# Adam, batches of 32 fresh images, 200 steps. Every step runs the arrayattn ops' forward and
# backward on the CPU.

optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
start = time.perf_counter()
for _ in range(200):
    x, y = make_batch(32)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"200 steps in {time.perf_counter() - start:.1f} s")

with torch.no_grad():
    x, y = make_batch(512)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"held-out accuracy: {accuracy:.1%} (chance: {1 / CLASSES:.0%})")

# %%
# The gradients reach every parameter of both attention blocks:

for name, p in model.named_parameters():
    if "params" in name:
        print(f"{name:22s} |grad| = {p.grad.norm():.3g}")

# %%
# The loss curve
# --------------

smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses, alpha=0.3, label="per step")
ax.plot(np.arange(9, len(losses)), smooth, label="10-step mean")
ax.axhline(np.log(CLASSES), color="gray", ls=":", label="chance (log 4)")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy")
ax.set_title(f"CNN with SASA + CBAM (arrayattn.torch), accuracy {accuracy:.0%}")
ax.legend()
fig.tight_layout()
plt.show()

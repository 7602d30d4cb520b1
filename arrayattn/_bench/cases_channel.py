"""Benchmark cases of the channel-attention blocks (SE, CBAM) and the conv2d primitive.

The PyTorch side is the same block written with ``torch.nn`` modules (SE as in timm's ``SEModule``
with Linear layers, CBAM as in ``Jongchan/attention-module`` without the BatchNorm) holding the same
weights, run forward (no_grad) or forward + ``autograd.grad`` for x and every parameter.
"""

from __future__ import annotations

import numpy as np

from .case import Case, torch_runner

__all__ = ["CASES", "torch_cbam", "torch_se"]


def _inputs(p: dict, dtype: str, spatial: bool):
    rng = np.random.default_rng(0)
    n, c, h, w = p["N"], p["C"], p["H"], p["W"]
    cr = max(1, c // p["r"])
    x = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((n, c, h, w), dtype=np.float32).astype(dtype)
    params = {
        "w1": (rng.standard_normal((cr, c)) / np.sqrt(c)).astype(dtype),
        "b1": (0.1 * rng.standard_normal(cr)).astype(dtype),
        "w2": (rng.standard_normal((c, cr)) / np.sqrt(cr)).astype(dtype),
        "b2": (0.1 * rng.standard_normal(c)).astype(dtype),
    }
    if spatial:
        params["w_spatial"] = (rng.standard_normal((1, 2, 7, 7)) / 7).astype(dtype)
    return x, params, dy


def torch_se(params: dict):
    """An ``nn.Module`` SE block holding ``params`` (NumPy arrays or tensors)."""
    import torch

    class SE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            t = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
            cr, c = t["w1"].shape
            self.fc1 = torch.nn.Linear(c, cr, bias="b1" in t, dtype=t["w1"].dtype)
            self.fc2 = torch.nn.Linear(cr, c, bias="b2" in t, dtype=t["w1"].dtype)
            with torch.no_grad():
                self.fc1.weight.copy_(t["w1"])
                self.fc2.weight.copy_(t["w2"])
                if "b1" in t:
                    self.fc1.bias.copy_(t["b1"])
                if "b2" in t:
                    self.fc2.bias.copy_(t["b2"])

        def forward(self, x):
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]

    return SE()


def torch_cbam(params: dict, pool_order: str = "avg_max"):
    """An ``nn.Module`` CBAM block (no BN after the spatial conv) holding ``params``."""
    import torch
    import torch.nn.functional as F

    class CBAM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch_se({k: v for k, v in params.items() if k in ("w1", "b1", "w2", "b2")})
            t = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
            k = t["w_spatial"].shape[-1]
            self.spatial = torch.nn.Conv2d(
                2, 1, k, padding=k // 2, bias="b_spatial" in t, dtype=t["w_spatial"].dtype
            )
            with torch.no_grad():
                self.spatial.weight.copy_(t["w_spatial"])
                if "b_spatial" in t:
                    self.spatial.bias.copy_(t["b_spatial"])

        def _fc(self, z):
            return self.mlp.fc2(F.relu(self.mlp.fc1(z)))

        def forward(self, x):
            mc = torch.sigmoid(self._fc(x.mean((2, 3))) + self._fc(x.amax((2, 3))))
            f1 = x * mc[:, :, None, None]
            pools = [f1.mean(1, keepdim=True), f1.amax(1, keepdim=True)]
            if pool_order == "max_avg":
                pools = pools[::-1]
            ms = torch.sigmoid(self.spatial(torch.cat(pools, 1)))
            return f1 * ms

    return CBAM()


def _block_flops(p: dict, mode: str) -> float:
    # memory-bound blocks: count the elementwise work (pool, scale, and their adjoints)
    n = p["N"] * p["C"] * p["H"] * p["W"]
    return (3.0 if mode == "fwd" else 9.0) * n


def _runner(name: str):
    def arrayattn_side(p: dict, dtype: str, mode: str):
        import arrayattn as aa

        x, params, dy = _inputs(p, dtype, name == "cbam")
        op = aa.cbam if name == "cbam" else aa.squeeze_excitation
        if mode == "fwd":
            return lambda: op(x, params)

        def run():
            y, res = op.fwd(x, params)
            return op.bwd(res, dy)

        return run

    def torch_side(p: dict, dtype: str, mode: str):
        import torch

        x, params, dy = _inputs(p, dtype, name == "cbam")
        m = torch_cbam(params) if name == "cbam" else torch_se(params)
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        return torch_runner(lambda: m(xt), [xt, *m.parameters()], dyt, mode)

    return arrayattn_side, torch_side


# -- conv2d ---------------------------------------------------------------------------------------


def _conv_inputs(p: dict, dtype: str):
    rng = np.random.default_rng(0)
    k = p["k"]
    x = rng.standard_normal((p["N"], p["C"], p["H"], p["W"]), dtype=np.float32).astype(dtype)
    w = (rng.standard_normal((p["O"], p["C"], k, k)) / np.sqrt(p["C"] * k * k)).astype(dtype)
    dy = rng.standard_normal((p["N"], p["O"], p["H"], p["W"]), dtype=np.float32).astype(dtype)
    return x, w, dy


def _conv_flops(p: dict, mode: str) -> float:
    fwd = 2.0 * p["N"] * p["O"] * p["C"] * p["k"] ** 2 * p["H"] * p["W"]
    return fwd if mode == "fwd" else 3.0 * fwd


def _conv_arrayattn(p: dict, dtype: str, mode: str):
    import arrayattn as aa

    x, w, dy = _conv_inputs(p, dtype)
    pad = p["k"] // 2
    if mode == "fwd":
        return lambda: aa.conv2d(x, w, padding=pad)

    def run():
        y, res = aa.conv2d.fwd(x, w, padding=pad)
        return aa.conv2d.bwd(res, dy)

    return run


def _conv_torch(p: dict, dtype: str, mode: str):
    import torch
    import torch.nn.functional as F

    x, w, dy = (torch.from_numpy(a) for a in _conv_inputs(p, dtype))
    pad = p["k"] // 2
    return torch_runner(lambda: F.conv2d(x, w, padding=pad), (x, w), dy, mode)


_BLOCK = {"N": 32, "C": 256, "H": 28, "W": 28, "r": 16}

CASES: dict[str, Case] = {
    "squeeze_excitation": Case("squeeze_excitation", dict(_BLOCK), _block_flops, *_runner("se")),
    "cbam": Case("cbam", dict(_BLOCK), _block_flops, *_runner("cbam")),
    "conv2d": Case(
        "conv2d",
        {"N": 8, "C": 64, "O": 64, "H": 56, "W": 56, "k": 3},
        _conv_flops,
        _conv_arrayattn,
        _conv_torch,
    ),
}

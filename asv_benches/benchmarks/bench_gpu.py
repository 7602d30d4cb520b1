"""GPU backends (``cupy``, ``numba_cuda``, ``array_api`` on CuPy) against PyTorch on CUDA.

Scaled dot-product attention (B=4, heads=8, L in {1024, 4096}, d=64), criss-cross attention
(B=2, H=W in {64, 128}, dk=16, dv=64) and 2-D neighbourhood attention (B=2, heads=4, H=W in
{56, 112}, d=32, K=7, NATTEN's clamped windows with a relative bias; PyTorch runs a gather-based
implementation that materialises the K² keys and values of every query). Every combination is
skipped (``NotImplementedError`` in ``setup``) where there is no CUDA device, no CuPy, or (for
``torch``) no CUDA build of torch.
Times are synchronised with the device. FLOPs: SDPA 4·B·H·L²·d forward (×3.5 with backward,
halved with causal); criss-cross 2·pixels·(H+W-1)·(dk+dv) forward, ×3 with backward;
neighbourhood 2·pixels·heads·K²·(d+dv) forward, ×3 with backward.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ["cupy", "numba_cuda", "array_api", "torch"]


def _cupy():
    try:
        import cupy

        if not cupy.cuda.is_available():
            raise NotImplementedError("no CUDA device")
    except ImportError as exc:
        raise NotImplementedError(f"cupy unavailable ({exc})") from exc
    return cupy


def _require(backend, op_name):
    import arrayattn as aa

    if backend in ("array_api", "torch"):
        return
    info = {b.name: b for b in aa.backends()}[backend]
    if not info.available or op_name not in (info.ops or ()):
        raise NotImplementedError(f"{backend} cannot run {op_name}: {info.reason}")


class _GPUBench:
    timeout = 900
    number = 1
    repeat = (3, 20, 30.0)
    warmup_time = 0.0
    op_name = ""

    def _inputs(self, cupy, dtype, size):
        raise NotImplementedError

    def _torch_fn(self, torch, arrays, mode):
        raise NotImplementedError

    def setup(self, backend, dtype, size):
        cupy = _cupy()
        self.sync = cupy.cuda.Device().synchronize
        arrays, kwargs, self.flops = self._inputs(cupy, dtype, size)
        if backend == "torch":
            try:
                import torch
            except ImportError as exc:
                raise NotImplementedError("torch unavailable") from exc
            if not torch.cuda.is_available():
                raise NotImplementedError("torch has no CUDA")
            self.fwd = self._torch_fn(torch, arrays, "fwd")
            self.fwd_bwd = self._torch_fn(torch, arrays, "fwd_bwd")
        else:
            import arrayattn as aa

            _require(backend, self.op_name)
            op = getattr(aa, self.op_name)

            def fwd():
                with aa.use_backend(backend):
                    return op(*arrays, **kwargs)

            def fwd_bwd():
                with aa.use_backend(backend):
                    out, res = op.fwd(*arrays, **kwargs)
                    return op.bwd(res, cupy.ones_like(out))

            self.fwd, self.fwd_bwd = fwd, fwd_bwd
        try:
            self.fwd_bwd()
        except Exception as exc:  # BackendError: this backend declines the dtype/size
            raise NotImplementedError(str(exc)) from exc
        self.sync()

    def time_fwd(self, backend, dtype, size):
        self.fwd()
        self.sync()

    def time_fwd_bwd(self, backend, dtype, size):
        self.fwd_bwd()
        self.sync()

    def track_gflops_fwd_bwd(self, backend, dtype, size):
        import time

        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.fwd_bwd()
            self.sync()
            times.append(time.perf_counter() - t0)
        return self.flops / float(np.median(times)) / 1e9

    track_gflops_fwd_bwd.unit = "GFLOP/s"


class GPUAttention(_GPUBench):
    param_names = ["backend", "dtype", "L"]
    params = [BACKENDS, ["float16", "float32"], [1024, 4096]]
    op_name = "scaled_dot_product_attention"

    def _inputs(self, cupy, dtype, size):
        rng = cupy.random.default_rng(0)
        q, k, v = (
            rng.standard_normal((4, 8, size, 64), dtype=cupy.float32).astype(dtype)
            for _ in range(3)
        )
        return (q, k, v), {"causal": True}, 3.5 * 4 * 4 * 8 * size * size * 64 / 2

    def _torch_fn(self, torch, arrays, mode):
        import torch.nn.functional as F

        q, k, v = (
            torch.as_tensor(a, device="cuda").requires_grad_(mode == "fwd_bwd") for a in arrays
        )

        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if mode == "fwd_bwd":
                out.backward(torch.ones_like(out))
            return out

        return run


class GPUCrissCross(_GPUBench):
    param_names = ["backend", "dtype", "HW"]
    params = [BACKENDS, ["float32", "float64"], [64, 128]]
    op_name = "criss_cross_attention"

    def _inputs(self, cupy, dtype, size):
        rng = cupy.random.default_rng(0)
        q = rng.standard_normal((2, size, size, 16)).astype(dtype)
        k = rng.standard_normal((2, size, size, 16)).astype(dtype)
        v = rng.standard_normal((2, size, size, 64)).astype(dtype)
        return (q, k, v), {}, 3 * 2 * 2 * size * size * (2 * size - 1) * 80

    def _torch_fn(self, torch, arrays, mode):
        q, k, v = (
            torch.as_tensor(a, device="cuda").requires_grad_(mode == "fwd_bwd") for a in arrays
        )

        def run():  # CCNet's pure-PyTorch criss-cross core (row + column energies, one softmax)
            h = q.shape[1]
            e_row = torch.einsum("bywc,byxc->bywx", q, k)
            e_col = torch.einsum("bywc,bzwc->bywz", q, k)
            eye = torch.eye(h, device=q.device, dtype=torch.bool)[None, :, None, :]
            e_col = e_col.masked_fill(eye, float("-inf"))
            a = torch.softmax(torch.cat([e_row, e_col], -1), -1)
            w = q.shape[2]
            out = torch.einsum("bywx,byxc->bywc", a[..., :w], v) + torch.einsum(
                "bywz,bzwc->bywc", a[..., w:], v
            )
            if mode == "fwd_bwd":
                out.backward(torch.ones_like(out))
            return out

        return run


class GPUNeighborhood(_GPUBench):
    param_names = ["backend", "dtype", "HW"]
    params = [BACKENDS, ["float16", "float32"], [56, 112]]
    op_name = "neighborhood_attention_2d"
    kernel = 7

    def _inputs(self, cupy, dtype, size):
        rng = cupy.random.default_rng(0)
        q, k, v = (
            rng.standard_normal((2, 4, size, size, 32), dtype=cupy.float32).astype(dtype)
            for _ in range(3)
        )
        t = 2 * self.kernel - 1
        bias = rng.standard_normal((4, t, t), dtype=cupy.float32).astype(dtype)
        flops = 3 * 2 * 2 * 4 * size * size * self.kernel**2 * 64
        return (q, k, v), {"kernel_size": self.kernel, "rel_bias": bias}, flops

    def _torch_fn(self, torch, arrays, mode):
        from arrayattn._glue.neighborhood import na_windows

        q, k, v = (
            torch.as_tensor(a, device="cuda").requires_grad_(mode == "fwd_bwd") for a in arrays[:3]
        )
        n, h, w, d = q.shape[1], q.shape[2], q.shape[3], q.shape[4]
        kk = self.kernel
        bias = torch.zeros(
            (n, 2 * kk - 1, 2 * kk - 1),
            device="cuda",
            dtype=q.dtype,
            requires_grad=mode == "fwd_bwd",
        )
        wy, wx = na_windows(h, w, kk, 1, "clamp", False, False)
        iy, ix = (torch.as_tensor(t.idx.T, device="cuda") for t in (wy, wx))  # (L, K)
        ry, rx = (torch.as_tensor(t.rel.T, device="cuda") for t in (wy, wx))
        flat = (iy[:, None, :, None] * w + ix[None, :, None, :]).reshape(h, w, kk * kk)
        rows = ry[:, None, :, None].expand(h, w, kk, kk).reshape(h, w, kk * kk)
        cols = rx[None, :, None, :].expand(h, w, kk, kk).reshape(h, w, kk * kk)
        scale = d**-0.5

        def run():  # gather the K² keys/values of every query (NATTEN's unfused reference path)
            kg = k.reshape(k.shape[0], n, h * w, d)[:, :, flat]  # (B, n, H, W, K², d)
            vg = v.reshape(v.shape[0], n, h * w, v.shape[-1])[:, :, flat]
            s = torch.einsum("bnhwd,bnhwkd->bnhwk", q, kg) * scale + bias[:, rows, cols]
            out = torch.einsum("bnhwk,bnhwkd->bnhwd", torch.softmax(s, -1), vg)
            if mode == "fwd_bwd":
                out.backward(torch.ones_like(out))
            return out

        return run

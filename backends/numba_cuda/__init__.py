"""The numba_cuda backend (kernels arrive with their issues)."""

KERNELS: dict = {}

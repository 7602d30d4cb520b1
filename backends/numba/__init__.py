"""The numba backend (kernels arrive with their issues)."""

KERNELS: dict = {}

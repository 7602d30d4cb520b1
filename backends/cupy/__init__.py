"""The cupy backend (kernels arrive with their issues)."""

KERNELS: dict = {}

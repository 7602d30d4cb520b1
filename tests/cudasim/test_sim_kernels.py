"""The registry-driven kernel-conformance test (tests/test_kernels.py) under the CUDA simulator."""

from test_kernels import (  # noqa: F401
    test_every_simulated_kernel_is_exercised,
    test_simulated_cuda_kernel_conforms,
)

"""arrayattn: attention mechanisms as pure array functions with hand-derived backward passes.

Every op runs on the arrays it is given (NumPy, CuPy, torch, JAX, array_api_strict, ...) through
the Python array API standard; fast kernels plug in as backends chosen by a setting.
"""

from ._config import get_backend, set_backend, use_backend
from ._op import Op, Residuals, registered_ops, vjp
from . import backends  # the subpackage, callable as backends()
from ._registry import BackendError
from ._version import __version__
from .attention import multi_head_attention, scaled_dot_product_attention

__all__ = sorted(
    [
        "BackendError",
        "Op",
        "Residuals",
        "__version__",
        "backends",
        "get_backend",
        "multi_head_attention",
        "registered_ops",
        "scaled_dot_product_attention",
        "set_backend",
        "use_backend",
        "vjp",
    ]
)

"""arrayattn: attention mechanisms as pure array functions with hand-derived backward passes.

Every op runs on the arrays it is given (NumPy, CuPy, torch, JAX, array_api_strict, ...) through
the Python array API standard; fast kernels plug in as backends chosen by a setting.
"""

from . import backends  # type: ignore[attr-defined]  # the subpackage (backends/), callable
from ._config import get_backend, set_backend, use_backend
from ._op import Op, Residuals, registered_ops, vjp
from ._registry import BackendError
from ._version import __version__
from .attention import multi_head_attention, scaled_dot_product_attention
from .channel import attention_condenser, cbam, spatial_pyramid_attention, squeeze_excitation
from .co_attention import co_attention, coda, cross_attention_fewshot
from .criss_cross import criss_cross_attention, criss_cross_block
from .danet import channel_attention, position_attention
from .fused import fused_attention
from .hard import (
    gumbel_softmax,
    hard_attention,
    hard_concrete_gate,
    moving_average_baseline,
    reinforce_cotangents,
)
from .linear_attention import efficient_attention, linear_attention
from .luong import bahdanau_attention, local_attention, luong_attention
from .merge import merge_attention
from .neighborhood import (
    halo_attention,
    neighborhood_attention_1d,
    neighborhood_attention_2d,
    sasa_block,
    sasa_relative_tables,
)
from .non_local import non_local_block
from .primitives import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    avg_pool2d,
    conv2d,
    elu,
    layer_norm,
    linear,
    max_pool2d,
    relu,
    sigmoid,
    tanh,
    upsample_bilinear2d,
    upsample_nearest2d,
)
from .set_transformer import isab, mab, pma, sab
from .sparse import sparse_attention, sparse_attention_mask

__all__ = [
    "BackendError",
    "Op",
    "Residuals",
    "__version__",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "attention_condenser",
    "avg_pool2d",
    "backends",
    "bahdanau_attention",
    "cbam",
    "channel_attention",
    "co_attention",
    "coda",
    "conv2d",
    "criss_cross_attention",
    "criss_cross_block",
    "cross_attention_fewshot",
    "efficient_attention",
    "elu",
    "fused_attention",
    "get_backend",
    "gumbel_softmax",
    "halo_attention",
    "hard_attention",
    "hard_concrete_gate",
    "isab",
    "layer_norm",
    "linear",
    "linear_attention",
    "local_attention",
    "luong_attention",
    "mab",
    "max_pool2d",
    "merge_attention",
    "moving_average_baseline",
    "multi_head_attention",
    "neighborhood_attention_1d",
    "neighborhood_attention_2d",
    "non_local_block",
    "pma",
    "position_attention",
    "registered_ops",
    "reinforce_cotangents",
    "relu",
    "sab",
    "sasa_block",
    "sasa_relative_tables",
    "scaled_dot_product_attention",
    "set_backend",
    "sigmoid",
    "sparse_attention",
    "sparse_attention_mask",
    "spatial_pyramid_attention",
    "squeeze_excitation",
    "tanh",
    "upsample_bilinear2d",
    "upsample_nearest2d",
    "use_backend",
    "vjp",
]

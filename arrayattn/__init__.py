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
from .channel import attention_condenser, cbam, spatial_pyramid_attention, squeeze_excitation
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
from .luong import bahdanau_attention, local_attention, luong_attention
from .criss_cross import criss_cross_attention, criss_cross_block
from .linear_attention import efficient_attention, linear_attention
from .sparse import sparse_attention, sparse_attention_mask
from .non_local import non_local_block
from .danet import channel_attention, position_attention
from .co_attention import co_attention, coda, cross_attention_fewshot
from .fused import fused_attention
from .set_transformer import isab, mab, pma, sab
from .hard import (
    gumbel_softmax,
    hard_attention,
    hard_concrete_gate,
    moving_average_baseline,
    reinforce_cotangents,
)
from .neighborhood import (
    halo_attention,
    neighborhood_attention_1d,
    neighborhood_attention_2d,
    sasa_block,
    sasa_relative_tables,
)

__all__ = sorted(
    [
        "BackendError",
        "attention_condenser",
        "cbam",
        "spatial_pyramid_attention",
        "squeeze_excitation",
        "halo_attention",
        "neighborhood_attention_1d",
        "neighborhood_attention_2d",
        "sasa_block",
        "sasa_relative_tables",
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "avg_pool2d",
        "conv2d",
        "elu",
        "layer_norm",
        "linear",
        "max_pool2d",
        "relu",
        "sigmoid",
        "tanh",
        "upsample_bilinear2d",
        "upsample_nearest2d",
        "Op",
        "Residuals",
        "__version__",
        "backends",
        "bahdanau_attention",
        "criss_cross_attention",
        "criss_cross_block",
        "efficient_attention",
        "fused_attention",
        "gumbel_softmax",
        "hard_attention",
        "hard_concrete_gate",
        "isab",
        "mab",
        "pma",
        "sab",
        "moving_average_baseline",
        "reinforce_cotangents",
        "get_backend",
        "linear_attention",
        "local_attention",
        "luong_attention",
        "multi_head_attention",
        "registered_ops",
        "scaled_dot_product_attention",
        "non_local_block",
        "channel_attention",
        "position_attention",
        "co_attention",
        "coda",
        "cross_attention_fewshot",
        "set_backend",
        "sparse_attention",
        "sparse_attention_mask",
        "use_backend",
        "vjp",
    ]
)

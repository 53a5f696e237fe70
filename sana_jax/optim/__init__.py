"""CAME and CAME-8bit optimizers as Optax gradient transformations."""

from sana_jax.optim.came import (
    DEFAULT_SCHEME,
    FactoredMoments,
    ScaleByCameState,
    came,
    dequantize_first_moment,
    quantize_first_moment,
    scale_by_came,
)
from sana_jax.optim.factoring import Factoring, came_pytorch_factoring, sana_factoring
from sana_jax.optim.memory import state_bytes
from sana_jax.optim.quantize import SANA_SCHEME, Quantized, Scheme, dequantize_blockwise, quantize_blockwise

__all__ = [
    "DEFAULT_SCHEME",
    "SANA_SCHEME",
    "FactoredMoments",
    "Factoring",
    "Quantized",
    "ScaleByCameState",
    "Scheme",
    "came",
    "came_pytorch_factoring",
    "dequantize_blockwise",
    "dequantize_first_moment",
    "quantize_blockwise",
    "quantize_first_moment",
    "sana_factoring",
    "scale_by_came",
    "state_bytes",
]

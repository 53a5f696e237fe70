"""The SANA linear DiT: configs, parameters and the pure forward function."""

from sana_jax.model.config import PRESETS, SanaConfig, preset
from sana_jax.model.transformer import (
    LOGICAL_AXIS_RULES,
    SanaTransformer,
    forward,
    forward_with_hidden,
    init_params,
    logical_axes,
    param_count,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "PRESETS",
    "SanaConfig",
    "SanaTransformer",
    "forward",
    "forward_with_hidden",
    "init_params",
    "logical_axes",
    "param_count",
    "preset",
]

"""Depth surgery on SANA models: growth, block importance, pruning, and the same surgery on any state.

Block weights are stacked on a leading depth axis under params["blocks"], so every operation is array
indexing and concatenation along that axis (`restack`), for params and optimizer states alike.
"""

from sana_jax.surgery.growth import STRATEGIES, fresh_blocks, grow, growth_plan
from sana_jax.surgery.importance import (
    DEFAULT_TIMESTEPS,
    block_cosines,
    block_importance,
    block_importance_per_timestep,
)
from sana_jax.surgery.pruning import most_important_blocks, prune, pruning_plan
from sana_jax.surgery.restack import RESIDUAL_OUTPUTS, DepthPlan, restack

__all__ = [
    "DEFAULT_TIMESTEPS",
    "RESIDUAL_OUTPUTS",
    "STRATEGIES",
    "DepthPlan",
    "block_cosines",
    "block_importance",
    "block_importance_per_timestep",
    "fresh_blocks",
    "grow",
    "growth_plan",
    "most_important_blocks",
    "prune",
    "pruning_plan",
    "restack",
]

"""Depth surgery on SANA models: growth, block importance, pruning, and the same surgery on any state.

Block weights are stacked on a leading depth axis under params["blocks"], so every operation is array
indexing and concatenation along that axis (`restack`), for params and optimizer states alike:

  new_config, params = grow(params, config, target_depth=60, keep=18, key=key)
  opt_state = restack(opt_state, growth_plan(config.depth, target_depth=60, keep=18))

  importance = block_importance(params, config, calibration_batches)
  keep = most_important_blocks(importance, n=config.depth - 2)
  new_config, params = prune(params, config, keep)
  opt_state = restack(opt_state, pruning_plan(config.depth, keep))
"""

from sana_jax.surgery.growth import STRATEGIES, fresh_blocks, grow, growth_plan
from sana_jax.surgery.importance import (
    DEFAULT_TIMESTEPS,
    block_cosines,
    block_importance,
    block_importance_on_samples,
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
    "block_importance_on_samples",
    "block_importance_per_timestep",
    "fresh_blocks",
    "grow",
    "growth_plan",
    "most_important_blocks",
    "prune",
    "pruning_plan",
    "restack",
]

"""Depth pruning: keep a chosen subset of blocks, picked by block importance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sana_jax.model.config import SanaConfig
from sana_jax.surgery.restack import DepthPlan, restack


def pruning_plan(depth: int, keep_blocks: Sequence[int]) -> DepthPlan:
    """The `DepthPlan` keeping `keep_blocks` of `depth` blocks, in the listed order."""
    keep_blocks = [int(i) for i in keep_blocks]
    if not keep_blocks:
        raise ValueError("keep_blocks is empty: a model needs at least one block")
    repeated = sorted({i for i in keep_blocks if keep_blocks.count(i) > 1})
    if repeated:
        raise ValueError(f"keep_blocks {keep_blocks} lists blocks {repeated} more than once")
    outside = [i for i in keep_blocks if not 0 <= i < depth]
    if outside:
        raise ValueError(f"keep_blocks {outside} are outside [0, depth={depth})")
    return DepthPlan(depth, tuple(keep_blocks))


def prune(params: dict, config: SanaConfig, keep_blocks: Sequence[int]) -> tuple[SanaConfig, dict]:
    """Keeps the blocks `keep_blocks` (in the listed order) and every non-block weight.

    Returns (config with depth=len(keep_blocks), pruned params); shardings along non-depth axes are
    kept. The same pruning of an optimizer state is `restack(state, pruning_plan(depth, keep_blocks))`.
    """
    plan = pruning_plan(config.depth, keep_blocks)
    return dataclasses.replace(config, depth=plan.target_depth), restack(params, plan)


def most_important_blocks(importance: np.ndarray | Sequence[float], n: int) -> list[int]:
    """Indices of the `n` blocks of highest importance, in ascending (model) order.

    Ties go to the earlier block.
    """
    importance = np.asarray(importance, np.float64)
    if importance.ndim != 1 or importance.size == 0:
        raise ValueError(f"importance has shape {importance.shape}; expected (depth,) with depth >= 1")
    if not 1 <= n <= importance.size:
        raise ValueError(f"n={n} must be in [1, depth={importance.size}]")
    return sorted(int(i) for i in np.argsort(-importance, kind="stable")[:n])

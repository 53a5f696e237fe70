"""Depth growth of a SANA model by restacking its block weights.

Strategies (SANA 1.5; NVlabs/Sana's model-growth initialiser):
  partial_preservation  SANA's "constant" strategy: keep the first `keep` blocks and every non-block
                        weight, append fresh blocks whose three residual outputs are zero, so each fresh
                        block is an identity at init while gradients still reach all of its weights.
                        SANA grew 1.6B (20 blocks, keeping 18) to 4.8B (60 blocks).
  cyclic                block i copies block i mod keep.
  block_expand          each of the first `keep` blocks is repeated target_depth / keep times in place.
With `zero_copies`, the residual outputs of every copy after a block's first appearance are zero, so the
grown model starts as the model truncated to `keep` blocks.

Fresh blocks are drawn as SANA's "constant" initialiser draws them: N(0, init_scale = 0.02) for the
modulation table, the q/k/v projections and the Mix-FFN's inverted conv (kernel and bias);
N(0, depthwise_init_scale = 0.2) for the 3x3 depthwise conv (kernel and bias); ones for the q/k RMSNorm
scales; zeros for attention biases and for the residual outputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sana_jax.model.config import SanaConfig
from sana_jax.surgery.restack import BLOCKS_KEY, DepthPlan, is_residual_output, key_names, restack

STRATEGIES = ("partial_preservation", "cyclic", "block_expand")
SANA_INIT_SCALE = 0.02
SANA_DEPTHWISE_INIT_SCALE = 0.2
_ATTENTIONS = ("attn1", "attn2")


def growth_plan(depth: int, *, target_depth: int, strategy: str = "partial_preservation",
                keep: int | None = None, zero_copies: bool = False) -> DepthPlan:
    """The `DepthPlan` of a growth from `depth` to `target_depth` blocks (see the module docstring).

    Also applies to optimizer states and EMA params through `restack`.
    """
    keep = depth if keep is None else keep
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown growth strategy {strategy!r}; expected one of {STRATEGIES}")
    if not 1 <= keep <= depth:
        raise ValueError(f"keep={keep} must be in [1, depth={depth}]")
    if target_depth < keep:
        raise ValueError(f"target_depth={target_depth} is smaller than keep={keep}")
    if strategy == "partial_preservation":
        if zero_copies:
            raise ValueError("zero_copies=True applies to 'cyclic' and 'block_expand'; "
                             "'partial_preservation' makes no copies")
        return DepthPlan(depth, tuple(range(keep)), num_fresh=target_depth - keep)
    if strategy == "cyclic":
        sources = tuple(i % keep for i in range(target_depth))
    else:
        if target_depth % keep:
            raise ValueError(f"block_expand needs target_depth={target_depth} to be a multiple of "
                             f"keep={keep}")
        repeats = target_depth // keep
        sources = tuple(i // repeats for i in range(target_depth))
    # A copy is any block whose source already appeared earlier in the stack.
    copies = tuple(i for i, source in enumerate(sources) if source in sources[:i])
    return DepthPlan(depth, sources, zeroed=copies if zero_copies else ())


def _fresh_leaf(names: list[str], shape: tuple[int, ...], dtype, key: jax.Array, init_scale: float,
                depthwise_init_scale: float) -> jax.Array:
    if is_residual_output(names) or (names[0] in _ATTENTIONS and names[-1] == "bias"):
        return jnp.zeros(shape, dtype)
    if len(names) > 1 and names[-2].startswith("norm"):
        return jnp.ones(shape, dtype)
    scale = depthwise_init_scale if "conv_depth" in names else init_scale
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def fresh_blocks(blocks: dict, num: int, key: jax.Array, *, init_scale: float = SANA_INIT_SCALE,
                 depthwise_init_scale: float = SANA_DEPTHWISE_INIT_SCALE) -> dict:
    """`num` new blocks shaped like the stacked `blocks` (params["blocks"]), each an identity at init.

    Returns a tree like `blocks` with leading axis `num`, initialised as in the module docstring.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(blocks)
    keys = jax.random.split(key, len(paths_and_leaves))
    leaves = [_fresh_leaf(key_names(path), (num, *leaf.shape[1:]), leaf.dtype, leaf_key, init_scale,
                          depthwise_init_scale)
              for (path, leaf), leaf_key in zip(paths_and_leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("plan", "init_scale", "depthwise_init_scale"))
def _grow(params: dict, key: jax.Array | None, plan: DepthPlan, init_scale: float,
          depthwise_init_scale: float) -> dict:
    fresh = None
    if plan.num_fresh:
        fresh = fresh_blocks(params[BLOCKS_KEY], plan.num_fresh, key, init_scale=init_scale,
                             depthwise_init_scale=depthwise_init_scale)
    return restack(params, plan, fresh)


def grow(params: dict, config: SanaConfig, *, target_depth: int, strategy: str = "partial_preservation",
         keep: int | None = None, key: jax.Array | None = None, zero_copies: bool = False,
         init_scale: float = SANA_INIT_SCALE,
         depthwise_init_scale: float = SANA_DEPTHWISE_INIT_SCALE) -> tuple[SanaConfig, dict]:
    """Grows a model to `target_depth` blocks.

    Args:
      params: the model's params (block weights stacked under params["blocks"]); may be sharded.
      config: its `SanaConfig`.
      target_depth: blocks of the grown model.
      strategy: "partial_preservation", "cyclic" or "block_expand" (module docstring).
      keep: how many leading blocks to keep and copy from (default: all).
      key: PRNG key for the fresh blocks of "partial_preservation".
      zero_copies: zero the residual outputs of copies ("cyclic", "block_expand").
      init_scale, depthwise_init_scale: standard deviations of the fresh blocks' random weights.

    Returns:
      (config with depth=target_depth, grown params). Under jit, so shardings along non-depth axes are
      kept; the same growth of an optimizer state is `restack(state, growth_plan(...))`.
    """
    plan = growth_plan(config.depth, target_depth=target_depth, strategy=strategy, keep=keep,
                       zero_copies=zero_copies)
    if plan.num_fresh and key is None:
        raise ValueError(f"strategy {strategy!r} adds {plan.num_fresh} fresh blocks: pass a PRNG key")
    grown = _grow(params, key if plan.num_fresh else None, plan, init_scale, depthwise_init_scale)
    return dataclasses.replace(config, depth=target_depth), grown

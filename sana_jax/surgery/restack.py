"""Depth surgery on any pytree whose stacked block leaves sit under a "blocks" key.

A `DepthPlan` says how the new stack of blocks is built from the old one: block i of the result is
old block `sources[i]`, followed by `num_fresh` fresh blocks; the residual outputs of the blocks listed
in `zeroed` are set to zero. `restack` applies a plan to params, EMA params and optimizer states alike,
since every leaf under a "blocks" key (params, or moments shaped like them or reduced to row/column
statistics) carries the same leading depth axis.

Optimizer state across surgery: the state is restacked, not rebuilt. CAME (and Adam) treat every depth
index of a stacked leaf independently (elementwise moments, row/column statistics within one layer,
the update clip per layer), so a pruned state is exactly the state the pruned model would have reached
after the same updates, and a copied block inherits the statistics of its source. Fresh blocks and
zeroed residual outputs get zero moments, which is CAME's initial state. A fresh optimizer state
instead would discard statistics that CAME's b3 = 0.9999 instability EMA needs thousands of steps to
rebuild, while pruning is followed by only about a hundred steps of fine-tuning. One caveat: optimizers
with a shared step count and bias correction (Adam) take their first steps on fresh blocks with the
old count, (1 - b1) / sqrt(1 - b2) times (about 3x) larger than from a fresh state; CAME has no bias
correction and is unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

BLOCKS_KEY = "blocks"
# (module, projection) name pairs of a block's three residual outputs: the self-attention and
# cross-attention output projections (kernel and bias) and the Mix-FFN point convolution.
RESIDUAL_OUTPUTS = (("attn1", "to_out"), ("attn2", "to_out"), ("ff", "conv_point"))


@dataclasses.dataclass(frozen=True)
class DepthPlan:
    """How a stack of `depth` blocks becomes `len(sources) + num_fresh` blocks.

    sources: for each leading block of the result, the index of the old block it copies.
    num_fresh: blocks appended after the copies (random params from `grow`, zero optimizer moments).
    zeroed: indices into the result whose residual outputs are set to zero.
    """

    depth: int
    sources: tuple[int, ...]
    num_fresh: int = 0
    zeroed: tuple[int, ...] = ()

    def __post_init__(self):
        # Tuples of Python ints keep the plan hashable: it is a static argument of `restack`.
        object.__setattr__(self, "sources", tuple(int(i) for i in self.sources))
        object.__setattr__(self, "zeroed", tuple(int(i) for i in self.zeroed))
        if not (isinstance(self.depth, int) and self.depth > 0):
            raise ValueError(f"DepthPlan.depth={self.depth!r}: expected a positive integer")
        bad = [i for i in self.sources if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"DepthPlan.sources {bad} are outside [0, depth={self.depth})")
        if self.num_fresh < 0:
            raise ValueError(f"DepthPlan.num_fresh={self.num_fresh}: expected a non-negative integer")
        if self.target_depth < 1:
            raise ValueError("DepthPlan has no blocks: sources is empty and num_fresh=0")
        bad = [i for i in self.zeroed if not 0 <= i < self.target_depth]
        if bad:
            raise ValueError(f"DepthPlan.zeroed {bad} are outside [0, target_depth={self.target_depth})")

    @property
    def target_depth(self) -> int:
        return len(self.sources) + self.num_fresh


def key_names(path: jax.tree_util.KeyPath) -> list[str]:
    """The names along a key path, e.g. ["blocks", "attn1", "to_out", "kernel"]."""
    return jax.tree_util.keystr(path, simple=True, separator="/").split("/")


def is_residual_output(names: list[str]) -> bool:
    """Whether a leaf (by its path names) belongs to one of a block's three residual outputs."""
    return any(pair in zip(names, names[1:], strict=False) for pair in RESIDUAL_OUTPUTS)


def _lookup(tree: Any, path: jax.tree_util.KeyPath, where: str) -> Any:
    node = tree
    for entry in path:
        try:
            if isinstance(entry, jax.tree_util.GetAttrKey):
                node = getattr(node, entry.name)
            elif isinstance(entry, jax.tree_util.SequenceKey):
                node = node[entry.idx]
            else:
                node = node[entry.key]
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"fresh blocks have no leaf {jax.tree_util.keystr(path)} for {where}") from e
    return node


@functools.partial(jax.jit, static_argnames="plan")
def restack(tree: Any, plan: DepthPlan, fresh: Any = None) -> Any:
    """Applies `plan` to every leaf of `tree` under a "blocks" key; other leaves pass through.

    Args:
      tree: any pytree (params, an optimizer state, ...); leaves under "blocks" have a leading depth axis
        of size `plan.depth`.
      plan: the `DepthPlan`.
      fresh: the `plan.num_fresh` appended blocks, a tree like `params["blocks"]` with leading axis
        num_fresh, looked up by the path below "blocks"; None appends zeros (optimizer moments).

    Returns:
      The tree with depth `plan.target_depth`. Pure jnp indexing under jit: sharded leaves stay sharded
      along their non-depth axes.
    """

    def leaf(path, x):
        names = key_names(path)
        if BLOCKS_KEY not in names:
            return x
        where = jax.tree_util.keystr(path)
        if x.ndim == 0 or x.shape[0] != plan.depth:
            raise ValueError(f"{where} has shape {x.shape}; expected a leading depth axis of {plan.depth}")
        parts = [jnp.take(x, jnp.asarray(plan.sources, jnp.int32), axis=0)] if plan.sources else []
        if plan.num_fresh:
            shape = (plan.num_fresh, *x.shape[1:])
            if fresh is None:
                parts.append(jnp.zeros(shape, x.dtype))
            else:
                new = _lookup(fresh, path[names.index(BLOCKS_KEY) + 1:], where)
                if new.shape != shape:
                    raise ValueError(f"fresh blocks for {where} have shape {new.shape}; expected {shape}")
                parts.append(new.astype(x.dtype))
        out = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        if plan.zeroed and is_residual_output(names):
            keep = jnp.ones(plan.target_depth, bool).at[jnp.asarray(plan.zeroed)].set(False)
            out = jnp.where(keep.reshape(-1, *([1] * (out.ndim - 1))), out, jnp.zeros((), out.dtype))
        return out

    return jax.tree_util.tree_map_with_path(leaf, tree)

"""The optimizer of a training config: schedule, global-norm clipping, CAME / CAME-8bit / AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from sana_jax.optim import DEFAULT_SCHEME, SANA_SCHEME, Quantized, came, quantize_first_moment

OPTIMIZERS = ("came", "came_8bit", "adamw")
SCHEDULES = ("constant", "cosine")
EIGHT_BIT_SCHEMES = {"dynamic": DEFAULT_SCHEME, "sana": SANA_SCHEME}


def learning_rate_schedule(config: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant or cosine decay to `end_lr`."""
    warmup = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
    if config.schedule == "constant":
        after = optax.constant_schedule(config.lr)
    else:
        after = optax.cosine_decay_schedule(config.lr, max(total_steps - config.warmup_steps, 1),
                                            alpha=config.end_lr / config.lr if config.lr else 0.0)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """config: the `optimizer` section (name, lr, schedule, warmup_steps, end_lr, weight_decay, b1, b2,
    clip_grad_norm, and optionally b3 and eight_bit_scheme, `came`'s own defaults when absent).

    Non-finite gradients skip the whole update (`optax.apply_if_finite`), which counts them in its state.
    """
    schedule = learning_rate_schedule(config, total_steps)
    if config.name == "adamw":
        inner = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    else:
        optional = {"b3": config.b3} if "b3" in config else {}
        if "eight_bit_scheme" in config:
            optional["scheme"] = EIGHT_BIT_SCHEMES[config.eight_bit_scheme]
        inner = came(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                     eight_bit=config.name == "came_8bit", **optional)
    clip = [optax.clip_by_global_norm(config.clip_grad_norm)] if config.clip_grad_norm > 0 else []
    # A huge error budget: the update is never applied with non-finite values; the trainer decides when
    # to stop from the count of consecutive skips.
    return optax.apply_if_finite(optax.chain(*clip, inner), max_consecutive_errors=2**30)


def carry_optimizer_state(fresh: optax.ApplyIfFiniteState, carried: optax.ApplyIfFiniteState, *,
                          eight_bit_scheme: str = "dynamic") -> optax.ApplyIfFiniteState:
    """The optimizer state a stage after surgery starts from: `carried` (the previous stage's final state,
    restacked to the new depth by `surgery.restack`) with the new stage's own learning-rate schedule count and
    non-finite counters taken from `fresh` (its `init`). Moments and any bias-correction count carry over; a
    CAME state carried into CAME-8bit has its first moments stored in 8 bits with `eight_bit_scheme`.

    Raises ValueError when the two states do not have the same structure and shapes (another optimizer).
    """
    is_node = lambda node: isinstance(node, optax.ScaleByScheduleState | Quantized)

    def fits(new, old) -> bool:
        if isinstance(new, Quantized) and not isinstance(old, Quantized):
            return jnp.shape(new.codes) == jnp.shape(old)
        return jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, old)

    try:
        ok = all(jax.tree.leaves(jax.tree.map(fits, fresh, carried, is_leaf=is_node)))
    except ValueError:  # another tree structure
        ok = False
    if not ok:
        raise ValueError("the carried optimizer state does not fit this stage's optimizer (another optimizer, "
                         "8-bit scheme or model); expected the same optimizer in both stages, or CAME then CAME-8bit")
    scheme = EIGHT_BIT_SCHEMES[eight_bit_scheme]

    def merge(new, old):
        if isinstance(new, optax.ScaleByScheduleState):
            return new
        if isinstance(new, Quantized) and not isinstance(old, Quantized):
            return quantize_first_moment(old, scheme)
        return old

    return fresh._replace(inner_state=jax.tree.map(merge, fresh.inner_state, carried.inner_state, is_leaf=is_node))

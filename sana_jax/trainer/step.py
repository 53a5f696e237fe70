"""The train state and the jitted training step (gradient accumulation, skip on non-finite, EMA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sana_jax.model import SanaConfig
from sana_jax.trainer.flow_matching import flow_matching_loss

TrainState = dict[str, Any]  # {"step", "params", "opt_state"[, "ema_params"]}


def init_train_state(params: dict, tx: optax.GradientTransformation, *, ema: bool) -> TrainState:
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state


def make_train_step(config: SanaConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    seed: int, noise_levels: dict, grad_accum: int,
                    ema_decay: float) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (state, metrics); randomness is a function of (seed, step).

    `noise_levels`: the `sample_sigmas` keywords of the flow-matching loss (`flow_matching.noise_levels`).

    The batch's leading axis is split into `grad_accum` micro-batches whose gradients are averaged.
    An update with a non-finite gradient is skipped (params, EMA and optimizer moments unchanged).
    """
    base_key = jax.random.key(seed)

    def loss_and_grad(params, batch, key):
        return jax.value_and_grad(flow_matching_loss)(params, config, batch, key, **noise_levels)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])
        model_batch = {k: batch[k] for k in ("latents", "text", "text_mask")}
        if grad_accum == 1:
            loss, grads = loss_and_grad(params, model_batch, key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), model_batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                loss, grads = loss_and_grad(params, micro_batch, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        if "ema_params" in state:
            finite = opt_state.last_finite
            # The decay warms up as (1 + t) / (10 + t) (as diffusers' EMAModel), so that a short run's
            # average is not dominated by the initial weights.
            t = state["step"].astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            new_state["ema_params"] = jax.tree.map(
                lambda e, p: jnp.where(finite, decay * e + (1.0 - decay) * p, e),
                state["ema_params"], new_state["params"])
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "skipped": 1 - opt_state.last_finite.astype(jnp.int32),
            "nonfinite_in_a_row": opt_state.notfinite_count,
            "nonfinite_total": opt_state.total_notfinite,
        }
        return new_state, metrics

    return step

"""Rectified-flow training objective: logit-normal timesteps, shift, MSE on the velocity noise - x0."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sana_jax.model import SanaConfig, forward
from sana_jax.sampling import shift_sigmas


def noise_levels(training) -> dict:
    """The `sample_sigmas` keywords (shift, logit_mean, logit_std, uniform_fraction) of a config's
    `training` section."""
    return {name: training[name] for name in ("shift", "logit_mean", "logit_std", "uniform_fraction")}


def sample_sigmas(key: jax.Array, batch: int, *, shift: float, logit_mean: float = 0.0,
                  logit_std: float = 1.0, uniform_fraction: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Training noise levels.

    sigma_base = floor(1000 * sigmoid(n)) / 1000 with n ~ N(mean, std), then shifted; with probability
    `uniform_fraction` a row instead takes sigma = floor(1000 * u) / 1000, u ~ U[0, 1), unshifted.
    Returns (sigmas (B,) float32, model timesteps (B,) = floor(sigma * 1000) as float32).
    """
    if uniform_fraction > 0:
        key, uniform_key, choice_key = jax.random.split(key, 3)
    n = logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32)
    base = jnp.floor(1000.0 * jax.nn.sigmoid(n)) / 1000.0
    sigmas = shift_sigmas(base, shift)
    if uniform_fraction > 0:
        uniform = jnp.floor(1000.0 * jax.random.uniform(uniform_key, (batch,), jnp.float32)) / 1000.0
        sigmas = jnp.where(jax.random.uniform(choice_key, (batch,)) < uniform_fraction, uniform, sigmas)
    return sigmas, jnp.floor(sigmas * 1000.0)


def flow_matching_loss(params: dict, config: SanaConfig, batch: dict, key: jax.Array, **levels) -> jax.Array:
    """Mean squared error of the predicted velocity against noise - x0, at noise levels drawn by
    `sample_sigmas(**levels)`.

    batch: {"latents" (B, H, W, C) clean latents x0, "text" (B, L, C_text), "text_mask" (B, L)}.
    """
    x0 = batch["latents"].astype(jnp.float32)
    sigma_key, noise_key = jax.random.split(key)
    sigmas, timesteps = sample_sigmas(sigma_key, x0.shape[0], **levels)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    s = sigmas[:, None, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    velocity = forward(params, config, x_t, timesteps, batch["text"], batch["text_mask"])
    return jnp.mean(jnp.square(velocity - (noise - x0)))


def evaluation_loss(params: dict, config: SanaConfig, batches: dict, key: jax.Array, **levels) -> jax.Array:
    """The flow-matching loss averaged over stacked batches (K, B, ...), batch k with noise from fold_in(key, k).

    With a fixed key and fixed batches, successive evaluations differ only through the params.
    """

    def one(k, batch):
        return flow_matching_loss(params, config, batch, jax.random.fold_in(key, k), **levels)

    count = jax.tree.leaves(batches)[0].shape[0]
    return jnp.mean(jax.lax.map(lambda args: one(*args), (jnp.arange(count), batches)))

"""Block importance (ShortGPT / Minitron style) from the residual stream around every block.

BI_i = 1 - E[cos(h_i, h_{i+1})]: the cosine similarity over the hidden axis between the tokens entering
and leaving block i, averaged over image tokens and calibration samples, per timestep; the importance
is its mean over timesteps. A block that leaves the stream unchanged scores 0.

At model timestep t (sigma = t / 1000) the input is x_t = (1 - sigma) x0 + sigma noise, where the noise
of the b-th batch (counting from 0) is `jax.random.normal(jax.random.fold_in(jax.random.key(noise_seed),
b), latents.shape)`, the same at every timestep. One jitted forward per batch and timestep collects the
whole stream (`forward_with_hidden`).

`block_importance_on_samples` measures the same on the model's own sampling path instead: the inputs x_t of
every sampler step from noise, for a calibration set of prompts, with the prompts' features (the
conditional branch), at the sampler's timesteps.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sana_jax import sampling
from sana_jax.model.config import SanaConfig
from sana_jax.model.transformer import forward_with_hidden

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
_COSINE_EPS = 1e-12


def block_cosines(hidden: jax.Array) -> jax.Array:
    """Mean cosine similarity between the input and output of each block.

    Args:
      hidden: (depth + 1, B, N, D) residual stream; entry i enters block i, entry i + 1 leaves it.
    Returns:
      (depth,) float32: per block, cos(h_i, h_{i+1}) over D averaged over the B * N tokens.
    """
    h = hidden.astype(jnp.float32)
    h_in, h_out = h[:-1], h[1:]
    dot = jnp.sum(h_in * h_out, axis=-1)
    norms = jnp.linalg.norm(h_in, axis=-1) * jnp.linalg.norm(h_out, axis=-1)
    return jnp.mean(dot / jnp.maximum(norms, _COSINE_EPS), axis=(1, 2))


@jax.jit
def _batch_cosines(params: dict, config: SanaConfig, latents: jax.Array, noise: jax.Array, text: jax.Array,
                   text_mask: jax.Array, timestep: jax.Array) -> jax.Array:
    sigma = timestep / 1000.0
    noisy = (1.0 - sigma) * latents + sigma * noise
    timesteps = jnp.full((latents.shape[0],), timestep, jnp.float32)
    _, hidden = forward_with_hidden(params, config, noisy, timesteps, text, text_mask)
    return block_cosines(hidden)


def _check_batch(batch: Mapping[str, np.ndarray], index: int, config: SanaConfig) -> None:
    missing = [k for k in ("latents", "text", "text_mask") if k not in batch]
    if missing:
        raise ValueError(f"batch {index} lacks {missing}; expected keys latents, text, text_mask")
    shape = np.shape(batch["latents"])
    if len(shape) != 4 or shape[-1] != config.in_channels:
        raise ValueError(f"batch {index} latents have shape {shape}; expected (B, H, W, "
                         f"{config.in_channels})")


def block_importance_per_timestep(params: dict, config: SanaConfig,
                                  batches: Iterable[Mapping[str, np.ndarray]], *,
                                  timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0,
                                  progress: bool = True) -> np.ndarray:
    """Block importance per timestep, (len(timesteps), depth) float64.

    Args:
      params, config: the model.
      batches: dicts with "latents" (B, H, W, C) clean latents, "text" (B, L, C_text) and "text_mask"
        (B, L) of 0/1; read once.
      timesteps: model timesteps in [0, 1000].
      noise_seed: seed of the noise (module docstring).
      progress: show a progress bar.
    """
    timesteps = [int(t) for t in timesteps]
    if not timesteps or not all(0 <= t <= 1000 for t in timesteps):
        raise ValueError(f"timesteps={timesteps}: expected a non-empty list of values in [0, 1000]")
    sums = np.zeros((len(timesteps), config.depth))
    tokens = 0
    total = len(batches) * len(timesteps) if hasattr(batches, "__len__") else None
    with tqdm(total=total, desc="block importance", unit="pass", disable=not progress) as bar:
        for index, batch in enumerate(batches):
            _check_batch(batch, index, config)
            latents = jnp.asarray(batch["latents"], jnp.float32)
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(noise_seed), index), latents.shape)
            count = latents.shape[0] * (latents.shape[1] // config.patch_size) * (
                latents.shape[2] // config.patch_size)
            for row, t in enumerate(timesteps):
                cosines = _batch_cosines(params, config, latents, noise, jnp.asarray(batch["text"]),
                                         jnp.asarray(batch["text_mask"]), jnp.float32(t))
                sums[row] += count * np.asarray(cosines, np.float64)
                bar.update()
            tokens += count
    if tokens == 0:
        raise ValueError("batches is empty: block importance needs at least one calibration batch")
    return 1.0 - sums / tokens


def block_importance(params: dict, config: SanaConfig, batches: Iterable[Mapping[str, np.ndarray]], *,
                     timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0,
                     progress: bool = True) -> np.ndarray:
    """Block importance BI, (depth,) float64: `block_importance_per_timestep` averaged over timesteps."""
    return block_importance_per_timestep(params, config, batches, timesteps=timesteps, noise_seed=noise_seed,
                                         progress=progress).mean(axis=0)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "guidance_scale", "shift", "solver"))
def _path_cosines(params: dict, config: SanaConfig, noise: jax.Array, text: jax.Array, text_mask: jax.Array,
                  null_text: jax.Array, null_mask: jax.Array, *, num_steps: int, guidance_scale: float, shift: float,
                  solver: str) -> jax.Array:
    _, path = sampling.sample_from_noise(params, config, noise, text, text_mask, null_text, null_mask,
                                         num_steps=num_steps, guidance_scale=guidance_scale, shift=shift,
                                         solver=solver, return_path=True)
    timesteps = jnp.asarray(sampling.solver_schedule(num_steps, shift, solver)[1], jnp.float32)

    def cosines(step):
        x, t = step
        _, hidden = forward_with_hidden(params, config, x, jnp.full((x.shape[0],), t), text, text_mask)
        return block_cosines(hidden)

    return jax.lax.map(cosines, (path, timesteps))


def block_importance_on_samples(params: dict, config: SanaConfig, text: np.ndarray, text_mask: np.ndarray,
                                null_text: np.ndarray, null_mask: np.ndarray, *, height: int, width: int,
                                num_steps: int = 20, guidance_scale: float = 1.0, shift: float = 3.0,
                                solver: str = "flow_dpm_solver", batch_size: int = 64, noise_seed: int = 0,
                                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Block importance along the model's own sampling path from a calibration set of prompts.

    Args:
      params, config: the model.
      text: (P, L, C_text) the prompts' features; text_mask: (P, L) of 0/1.
      null_text, null_mask: the negative caption of classifier-free guidance (as in `sampling.generate`).
      height, width: latent size in latent pixels.
      num_steps, guidance_scale, shift, solver: the sampler (`sampling.sample_from_noise`).
      batch_size: prompts per jitted call; the noise of call b is normal(fold_in(key(noise_seed), b)).
      progress: show a progress bar.
    Returns:
      (importance (num_steps, depth) float64: 1 - the mean cosine of each block's input and output at every
      step's input x_t, over the prompts' image tokens; timesteps (num_steps,): the sampler's timesteps).
    """
    if len(text) == 0 or len(text) != len(text_mask):
        raise ValueError(f"text has {len(text)} prompts and text_mask {len(text_mask)}: expected the same "
                         "positive number")
    sums, count = np.zeros((num_steps, config.depth)), 0
    starts = range(0, len(text), batch_size)
    for index, start in enumerate(tqdm(starts, desc="block importance on samples", disable=not progress)):
        rows = slice(start, start + batch_size)
        chunk = jnp.asarray(text[rows], jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(noise_seed), index),
                                  (chunk.shape[0], height, width, config.in_channels), jnp.float32)
        cosines = _path_cosines(params, config, noise, chunk, jnp.asarray(text_mask[rows]), jnp.asarray(null_text),
                                jnp.asarray(null_mask), num_steps=num_steps, guidance_scale=guidance_scale,
                                shift=shift, solver=solver)
        sums += chunk.shape[0] * np.asarray(cosines, np.float64)
        count += chunk.shape[0]
    return 1.0 - sums / count, np.asarray(sampling.solver_schedule(num_steps, shift, solver)[1], np.float64)

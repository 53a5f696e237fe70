"""N candidate latents per prompt that differ only in their starting noise (inference-time scaling).

The noise of candidate i of prompt p is drawn from `fold_in(fold_in(key, p), i)`, so any candidate can
be regenerated alone (pass its `prompt_ids` and `first_candidate`) and results do not depend on how
candidates are chunked. Candidates of one chunk are vmapped inside one jitted call; chunks run in a
Python loop through the same compiled function, so N is bounded by time, not memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax import model as sana_model
from sana_jax.model.config import SanaConfig
from sana_jax.sampling import classifier_free_guidance, sample_flow


def candidate_noise(key: jax.Array, prompt_id: jax.Array | int, candidate_id: jax.Array | int,
                    shape: tuple[int, ...]) -> jax.Array:
    """The starting noise (shape) float32 of candidate `candidate_id` of prompt `prompt_id`."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, prompt_id), candidate_id), shape)


def sample_from_noise(
    params,
    config: SanaConfig,
    noise: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    null_text: jax.Array,
    null_mask: jax.Array,
    *,
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    shift: float = 3.0,
    solver: str = "flow_dpm_solver",
) -> jax.Array:
    """Samples latents from given noise with classifier-free guidance (pure; jit- and vmap-able).

    Args:
      params, config: the model.
      noise: (B, h, w, config.in_channels) starting noise.
      text: (B, L, C_text) caption features; text_mask: (B, L) of 0/1.
      null_text, null_mask: the negative caption, broadcastable to text's and text_mask's shapes.
      num_steps, shift, solver: see `sana_jax.sampling.sample_flow`; guidance_scale 1 runs the positive
        branch alone. All static.

    Returns:
      (B, h, w, config.in_channels) float32 latents.
    """
    if guidance_scale == 1.0:
        velocity = lambda x, t: sana_model.forward(params, config, x, t, text, text_mask)
    else:
        both_text = jnp.concatenate([jnp.broadcast_to(null_text, text.shape).astype(text.dtype), text])
        both_mask = jnp.concatenate([jnp.broadcast_to(null_mask, text_mask.shape).astype(text_mask.dtype),
                                     text_mask])
        velocity = classifier_free_guidance(
            lambda x, t: sana_model.forward(params, config, x, t, both_text, both_mask), guidance_scale)
    return sample_flow(velocity, noise, num_steps=num_steps, shift=shift, solver=solver)


@functools.partial(jax.jit, static_argnames=("config", "height", "width", "num_steps", "guidance_scale", "shift",
                                             "solver"))
def _sample_chunk(params, config: SanaConfig, text, text_mask, null_text, null_mask, key, prompt_ids,
                  candidate_ids, *, height, width, num_steps, guidance_scale, shift, solver):
    """Latents (P, n, h, w, C) of the n candidates `candidate_ids` (n,) of prompts `prompt_ids` (P,)."""
    shape = (height, width, config.in_channels)
    per_prompt = jax.vmap(candidate_noise, in_axes=(None, 0, None, None))
    noise = jax.vmap(per_prompt, in_axes=(None, None, 0, None))(key, prompt_ids, candidate_ids, shape)
    sample = functools.partial(sample_from_noise, params, config, text=text, text_mask=text_mask,
                               null_text=null_text, null_mask=null_mask, num_steps=num_steps,
                               guidance_scale=guidance_scale, shift=shift, solver=solver)
    return jnp.swapaxes(jax.vmap(sample)(noise), 0, 1)


def generate_candidates(
    params,
    config: SanaConfig,
    text: jax.Array,
    text_mask: jax.Array,
    null_text: jax.Array,
    null_mask: jax.Array,
    key: jax.Array,
    *,
    num_candidates: int,
    height: int,
    width: int,
    chunk_size: int | None = None,
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    shift: float = 3.0,
    solver: str = "flow_dpm_solver",
    prompt_ids: Sequence[int] | None = None,
    first_candidate: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Samples `num_candidates` latents for each of P prompts, differing only in their noise.

    Args:
      params, config: the model.
      text: (P, L, C_text) caption features; text_mask: (P, L) of 0/1.
      null_text, null_mask: the negative caption, (L, C_text) and (L,) or broadcastable to text's shapes.
      key: PRNG key; candidate i of prompt p starts from `candidate_noise(key, p, i, ...)`.
      num_candidates: N, candidates per prompt.
      height, width: latent size (multiples of config.patch_size).
      chunk_size: candidates per jitted call (all N by default); the last chunk is padded to this size.
      num_steps, guidance_scale, shift, solver: see `sample_from_noise`.
      prompt_ids: the ids p of the P prompts (default 0..P-1), to regenerate some prompts of a larger set.
      first_candidate: id of the first candidate; candidates `first_candidate + 0..N-1` are drawn.
      mesh: when given, the candidates of a chunk are sharded over its "data" axis (chunk_size must be
        a multiple of that axis' size) and the model and captions are replicated over the mesh.

    Returns:
      (P, N, height, width, config.in_channels) float32 latents.
    """
    p = config.patch_size
    if height % p or width % p or height < 1 or width < 1:
        raise ValueError(f"latent size {height}x{width}: expected positive multiples of patch_size={p}")
    if text.ndim != 3 or text.shape[-1] != config.caption_channels or text_mask.shape != text.shape[:2]:
        raise ValueError(f"text {text.shape} / text_mask {text_mask.shape}: "
                         f"expected (P, L, {config.caption_channels}) / (P, L)")
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates!r}: expected an integer >= 1")
    chunk_size = num_candidates if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected an integer >= 1")
    if mesh is not None and chunk_size % mesh.shape["data"]:
        raise ValueError(f"chunk_size={chunk_size} is not a multiple of the mesh's data axis "
                         f"({mesh.shape['data']} devices)")
    prompt_ids = np.arange(len(text)) if prompt_ids is None else np.asarray(prompt_ids)
    if prompt_ids.shape != (len(text),):
        raise ValueError(f"prompt_ids of shape {prompt_ids.shape}: expected one id per prompt ({len(text)},)")

    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params, text, text_mask, null_text, null_mask, key, prompt_ids = jax.device_put(
            (params, text, text_mask, null_text, null_mask, key, prompt_ids), replicated)

    chunks = []
    for start in range(0, num_candidates, chunk_size):
        ids = first_candidate + start + np.arange(chunk_size)  # The last chunk runs padded ids too.
        if mesh is not None:
            ids = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        latents = _sample_chunk(params, config, text, text_mask, null_text, null_mask, key, prompt_ids, ids,
                                height=height, width=width, num_steps=num_steps, guidance_scale=guidance_scale,
                                shift=shift, solver=solver)
        chunks.append(np.asarray(latents))
    return np.concatenate(chunks, axis=1)[:, :num_candidates]

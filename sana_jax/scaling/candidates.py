"""N candidate latents per prompt that differ only in their starting noise (inference-time scaling).

The noise of candidate i of prompt p is drawn from `fold_in(fold_in(key, p), i)`, so any candidate can
be regenerated alone (pass its `prompt_ids` and `first_candidate`) and results do not depend on how
candidates are chunked. Candidates of one chunk are vmapped inside one jitted call; chunks run in a
Python loop through the same compiled function, so N is bounded by time, not memory. By default a chunk
is as many candidates as fit in a quarter of the device's free memory (measured on the compiled sampler).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sana_jax.model.config import SanaConfig
from sana_jax.sampling import sample_from_noise


def candidate_noise(key: jax.Array, prompt_id: jax.Array | int, candidate_id: jax.Array | int,
                    shape: tuple[int, ...]) -> jax.Array:
    """The starting noise (shape) float32 of candidate `candidate_id` of prompt `prompt_id`."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, prompt_id), candidate_id), shape)


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


def memory_budget(device: jax.Device) -> int:
    """Bytes one sampling call may use on `device`: a quarter of what it has free (free host memory on a CPU),
    leaving room for the decoded images and for XLA using somewhat more than it plans (measured: 1.3x)."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // 4


def chunk_size_for_memory(*, bytes_needed: int, num_candidates: int, available: int) -> int:
    """The most candidates, from 1 to `num_candidates`, whose share of `bytes_needed` (the memory that
    sampling all `num_candidates` at once takes) fits in `available` bytes."""
    per_candidate = max(1, math.ceil(bytes_needed / num_candidates))
    return max(1, min(num_candidates, available // per_candidate))


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
    progress: bool = False,
) -> np.ndarray:
    """Samples `num_candidates` latents for each of P prompts, differing only in their noise.

    Args:
      params, config: the model.
      text: (P, L, C_text) caption features; text_mask: (P, L) of 0/1.
      null_text, null_mask: the negative caption, (L, C_text) and (L,) or broadcastable to text's shapes.
      key: PRNG key; candidate i of prompt p starts from `candidate_noise(key, p, i, ...)`.
      num_candidates: N, candidates per prompt.
      height, width: latent size (multiples of config.patch_size).
      chunk_size: candidates per jitted call; the last chunk is padded to this size. Default: all N, or as
        many as fit in `memory_budget` when all N do not (a multiple of the mesh's "data" axis).
      num_steps, guidance_scale, shift, solver: see `sana_jax.sampling.sample_from_noise`.
      prompt_ids: the ids p of the P prompts (default 0..P-1), to regenerate some prompts of a larger set.
      first_candidate: id of the first candidate; candidates `first_candidate + 0..N-1` are drawn.
      mesh: when given, the candidates of a chunk are sharded over its "data" axis (chunk_size must be
        a multiple of that axis' size) and the model and captions are replicated over the mesh.
      progress: show a progress bar of the candidates sampled.

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
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected an integer >= 1")
    data = 1 if mesh is None else mesh.shape["data"]
    if chunk_size is not None and chunk_size % data:
        raise ValueError(f"chunk_size={chunk_size} is not a multiple of the mesh's data axis ({data} devices)")
    prompt_ids = np.arange(len(text)) if prompt_ids is None else np.asarray(prompt_ids)
    if prompt_ids.shape != (len(text),):
        raise ValueError(f"prompt_ids of shape {prompt_ids.shape}: expected one id per prompt ({len(text)},)")

    ids_sharding = None
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params, text, text_mask, null_text, null_mask, key, prompt_ids = jax.device_put(
            (params, text, text_mask, null_text, null_mask, key, prompt_ids), replicated)
        ids_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def compile_sampler(n: int) -> jax.stages.Compiled:
        ids = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=ids_sharding)
        return _sample_chunk.lower(params, config, text, text_mask, null_text, null_mask, key, prompt_ids, ids,
                                   height=height, width=width, num_steps=num_steps, guidance_scale=guidance_scale,
                                   shift=shift, solver=solver).compile()

    if chunk_size is None:
        chunk_size = -(-num_candidates // data) * data
        sampler = compile_sampler(chunk_size)
        memory = sampler.memory_analysis()
        if memory is not None:
            fits = chunk_size_for_memory(bytes_needed=memory.temp_size_in_bytes + memory.output_size_in_bytes,
                                         num_candidates=chunk_size,
                                         available=memory_budget(jax.local_devices()[0]))
            if fits < chunk_size:
                chunk_size = max(data, fits // data * data)
                sampler = compile_sampler(chunk_size)
    else:
        sampler = compile_sampler(chunk_size)

    chunks = []
    with tqdm(total=num_candidates, desc="candidates", unit="candidate", disable=not progress, leave=False) as bar:
        for start in range(0, num_candidates, chunk_size):
            ids = (first_candidate + start + np.arange(chunk_size)).astype(np.int32)  # The last chunk is padded.
            if mesh is not None:
                ids = jax.device_put(ids, ids_sharding)
            chunks.append(np.asarray(sampler(params, text, text_mask, null_text, null_mask, key, prompt_ids, ids)))
            bar.update(min(chunk_size, num_candidates - start))
    return np.concatenate(chunks, axis=1)[:, :num_candidates]

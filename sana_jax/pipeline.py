"""`SanaPipeline`: a diffusers SANA / SANA 1.5 pipeline folder turned into images in one call.

  pipe = SanaPipeline.from_pretrained("Sana_1600M_1024px_diffusers")
  images = pipe(["a cat sleeping"], key=jax.random.key(0))  # (1, 1024, 1024, 3) float32 in [0, 1]

The folder is the one diffusers' `SanaPipeline.save_pretrained` writes (`model_index.json`, `transformer/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). Every piece is the library's own: the transformer is
converted on the fly by `sana_jax.convert.read_diffusers`, prompts are encoded by
`sana_jax.text_encoder.GemmaTextEncoder` (diffusers' complex human instruction and token selection), the
flow is integrated by `sana_jax.sampling.sample_flow` (Flow-DPM-Solver) with the scheduler's flow shift, and
latents are decoded by `sana_jax.autoencoder.DCAE`. This module is only the glue, written to reproduce
diffusers' `SanaPipeline.__call__` (with `use_resolution_binning=False`): same prompts and same initial
latents give the same images.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax import convert, sampling
from sana_jax import model as sana_model
from sana_jax.autoencoder import DCAE
from sana_jax.model.config import SanaConfig
from sana_jax.text_encoder import BACKENDS, DTYPES, GemmaTextEncoder

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_BACKENDS = ("auto", *BACKENDS)
SCHEDULER_CONFIG = "scheduler_config.json"

# Scheduler settings the samplers here implement: field -> (required value, diffusers' default when
# scheduler_config.json omits the field).
_FLOW_DPM_SOLVER = {  # DPMSolverMultistepScheduler, as `sampling.sample_flow` implements it.
    "use_flow_sigmas": (True, False),
    "prediction_type": ("flow_prediction", "epsilon"),
    "algorithm_type": ("dpmsolver++", "dpmsolver++"),
    "solver_order": (2, 2),
    "solver_type": ("midpoint", "midpoint"),
    "final_sigmas_type": ("zero", "zero"),
    "thresholding": (False, False),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "use_lu_lambdas": (False, False),
    "use_dynamic_shifting": (False, False),
    "num_train_timesteps": (sampling.NUM_TRAIN_TIMESTEPS, 1000),
}
_FLOW_MATCH_EULER = {  # FlowMatchEulerDiscreteScheduler, as `sampling.flow_match_euler_schedule` reproduces it.
    "use_dynamic_shifting": (False, False),
    "invert_sigmas": (False, False),
    "shift_terminal": (None, None),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "stochastic_sampling": (False, False),
    "num_train_timesteps": (sampling.NUM_TRAIN_TIMESTEPS, 1000),
}
SCHEDULERS = {  # diffusers class -> (our solver, required settings, shift field, its default)
    "DPMSolverMultistepScheduler": ("flow_dpm_solver", _FLOW_DPM_SOLVER, "flow_shift", 1.0),
    "FlowMatchEulerDiscreteScheduler": ("flow_match_euler", _FLOW_MATCH_EULER, "shift", 1.0),
}


def scheduler_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"shift": ..., "solver": ...}` of a diffusers scheduler_config.json, for `sample_latents`.

    Two schedulers are reproduced: SANA's Flow-DPM-Solver, `DPMSolverMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift=s)` with its defaults otherwise (solver "flow_dpm_solver",
    `sampling.sample_flow`), and `FlowMatchEulerDiscreteScheduler(shift=s)` (solver "flow_match_euler",
    whose schedule differs from `sampling.flow_sigmas`: see `sampling.flow_match_euler_schedule`).
    Raises ValueError naming the first setting that differs.
    """
    name = values.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler _class_name={name!r}: expected one of {sorted(SCHEDULERS)}")
    solver, required_values, shift_field, shift_default = SCHEDULERS[name]
    for field, (required, default) in required_values.items():
        if values.get(field, default) != required:
            raise ValueError(f"scheduler {field}={values.get(field, default)!r}: expected {required!r} "
                             f"(the {name} settings implemented here)")
    shift = values.get(shift_field, shift_default)
    if not (isinstance(shift, int | float) and shift > 0):
        raise ValueError(f"scheduler {shift_field}={shift!r}: expected a positive number")
    return {"shift": float(shift), "solver": solver}


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "guided", "shift", "solver"))
def sample_latents(params, config: SanaConfig, latents: jax.Array, text: jax.Array, text_mask: jax.Array,
                   null_text: jax.Array, null_mask: jax.Array, guidance_scale: jax.Array, *, num_steps: int,
                   guided: bool, shift: float, solver: str = "flow_dpm_solver") -> jax.Array:
    """Integrates the flow from initial latents (B, h, w, C) to clean latents, as diffusers' SanaPipeline.

    `solver`: one of `sampling.SOLVERS` ("flow_match_euler" for diffusers' FlowMatchEulerDiscreteScheduler).

    With `guided`, the model sees the batch [negative, positive] and the velocity is combined by
    `sampling.classifier_free_guidance` with the (traced) `guidance_scale`; without, the positive branch runs
    alone. A model with twice the latent channels out (a learned-sigma head) keeps the first half.
    """
    channels = latents.shape[-1]

    def velocity(x, t, features, mask):
        return sana_model.forward(params, config, x, t, features, mask)[..., :channels]

    if guided:
        both_text, both_mask = jnp.concatenate([null_text, text]), jnp.concatenate([null_mask, text_mask])
        velocity_fn = sampling.classifier_free_guidance(lambda x, t: velocity(x, t, both_text, both_mask),
                                                        guidance_scale)
    else:
        velocity_fn = lambda x, t: velocity(x, t, text, text_mask)
    return sampling.sample_flow(velocity_fn, latents, num_steps=num_steps, shift=shift, solver=solver)


class SanaPipeline:
    """Prompts -> images with a SANA transformer, Gemma-2 text features, Flow-DPM-Solver and DC-AE.

    Attributes:
      config, params: the transformer (`sana_jax.model`).
      text_encoder: a `GemmaTextEncoder` (or any object with `encode_text` and `max_length`; non-empty negative
        prompts need `encode_text(prompts, instruction=False)`).
      autoencoder: a `DCAE` (or any object with `decode`, `downsample` and `latent_channels`).
      shift, solver: the sampler (`sample_latents`), from the folder's scheduler config.
      source: the diffusers folder this pipeline was loaded from (None if built directly); `save_pretrained`
        copies its other components.
    """

    def __init__(self, config: SanaConfig, params: Any, text_encoder: Any, autoencoder: Any, *,
                 shift: float = 3.0, solver: str = "flow_dpm_solver", source: str | os.PathLike | None = None):
        if autoencoder.latent_channels != config.in_channels:
            raise ValueError(f"autoencoder latent_channels={autoencoder.latent_channels} != transformer "
                             f"in_channels={config.in_channels}")
        if config.out_channels not in (config.in_channels, 2 * config.in_channels):
            raise ValueError(f"transformer out_channels={config.out_channels}: expected in_channels "
                             f"({config.in_channels}) or twice that")
        self.config = config
        self.params = params
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.shift = shift
        self.solver = solver
        self.source = None if source is None else Path(source)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: str = "float32", text_backend: str = "auto",
                        max_sequence_length: int = 300, text_batch_size: int = 8) -> SanaPipeline:
        """Loads a diffusers SANA / SANA 1.5 pipeline folder.

        Args:
          folder: holds model_index.json and the transformer/, vae/, text_encoder/, tokenizer/ and
            scheduler/ folders.
          dtype: "float32" or "bfloat16" for the transformer (params and compute) and Gemma-2; the DC-AE
            runs in float32.
          text_backend: "jax" (`sana_jax.text_encoder.gemma2_forward`), "torch" (transformers) or "auto"
            (jax when text_encoder/ holds a Gemma-2 in safetensors).
          max_sequence_length: text positions per prompt (diffusers' `max_sequence_length`, 300).
          text_batch_size: prompts per Gemma-2 forward pass.
        """
        folder = Path(folder)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
        if text_backend not in TEXT_BACKENDS:
            raise ValueError(f"text_backend={text_backend!r}: expected one of {TEXT_BACKENDS}")
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder / 'model_index.json'} not found: expected a diffusers pipeline "
                                    "folder (what SanaPipeline.save_pretrained writes)")
        missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing the pipeline component folders {missing}")
        scheduler_file = folder / "scheduler" / SCHEDULER_CONFIG
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"{scheduler_file} not found")
        settings = scheduler_settings(json.loads(scheduler_file.read_text()))

        config, params = convert.read_diffusers(folder / "transformer", dtype=dtype, compute_dtype=dtype)
        autoencoder = DCAE.from_pretrained(folder / "vae")
        text_encoder = GemmaTextEncoder(str(folder / "text_encoder"), tokenizer_path=str(folder / "tokenizer"),
                                        backend=text_backend, max_length=max_sequence_length, dtype=dtype,
                                        batch_size=text_batch_size)
        return cls(config, params, text_encoder, autoencoder, source=folder, **settings)

    def with_transformer(self, config: SanaConfig, params: Any) -> SanaPipeline:
        """The same pipeline with another transformer (e.g. grown or pruned by `sana_jax.surgery`)."""
        return SanaPipeline(config, params, self.text_encoder, self.autoencoder, shift=self.shift,
                            solver=self.solver, source=self.source)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: str | None = None) -> None:
        """Writes a diffusers pipeline folder that diffusers' `SanaPipeline.from_pretrained` loads.

        The transformer is this pipeline's (`config`, `params`, written by `convert.write_diffusers` in
        `dtype`, default the params' own); model_index.json and every other component are copied from
        `source`, the folder the pipeline was loaded from.
        """
        if self.source is None:
            raise ValueError("save_pretrained needs the folder this pipeline was loaded from (source=...) for "
                             "the text encoder, tokenizer, autoencoder and scheduler")
        folder = Path(folder)
        if folder.resolve() == self.source.resolve():
            raise ValueError(f"{folder}: is the source folder; write to another one")
        folder.mkdir(parents=True, exist_ok=True)
        for entry in self.source.iterdir():
            if entry.name == "transformer":
                continue
            if entry.is_dir():
                shutil.copytree(entry, folder / entry.name, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, folder / entry.name)
        if (folder / "transformer").exists():
            shutil.rmtree(folder / "transformer")
        convert.write_diffusers(folder / "transformer", self.config, self.params, dtype=dtype)

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel."""
        return self.autoencoder.downsample

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] = ""
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(text (B, L, C), mask (B, L), negative text (B, L, C), negative mask (B, L)) as diffusers'
        `SanaPipeline.encode_prompt`: prompts with the complex human instruction, negative prompts without."""
        text, mask = self.text_encoder.encode_text(list(prompts))
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if all(not n.strip() for n in negatives):  # The null caption, without the prefix for any encoder.
            null_text, null_mask = self.text_encoder.encode_text(negatives)
        else:
            null_text, null_mask = self.text_encoder.encode_text(negatives, instruction=False)
        return text, mask, null_text, null_mask

    def __call__(self, prompts: str | Sequence[str], *, num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 latents: Any = None, key: jax.Array | None = None, negative_prompt: str | Sequence[str] = "",
                 height: int | None = None, width: int | None = None) -> np.ndarray:
        """Images (B, H, W, 3) float32 in [0, 1] for B prompts.

        Args:
          prompts: one prompt or a list of B.
          num_inference_steps: solver steps.
          guidance_scale: classifier-free guidance; as in diffusers, values <= 1 run the positive branch alone.
          latents: the initial noise, channels-last (B, h, w, C) with C the latent channels; default standard
            normal noise from `key`.
          key: PRNG key of the noise when `latents` is None (default `jax.random.key(0)`).
          negative_prompt: one for all prompts, or one per prompt; encoded without the instruction prefix.
          height, width: image size in pixels when `latents` is None (default the transformer's
            sample_size times the autoencoder's downsampling), multiples of downsample * patch_size.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        if not isinstance(num_inference_steps, int | np.integer) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected an integer >= 1")
        channels, multiple = self.config.in_channels, self.downsample * self.config.patch_size
        if latents is None:
            height = self.config.sample_size * self.downsample if height is None else height
            width = self.config.sample_size * self.downsample if width is None else width
            if height % multiple or width % multiple or height < 1 or width < 1:
                raise ValueError(f"height={height}, width={width}: expected positive multiples of {multiple}")
            key = jax.random.key(0) if key is None else key
            latents = jax.random.normal(key, (len(prompts), height // self.downsample,
                                              width // self.downsample, channels), jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if (latents.ndim != 4 or latents.shape[0] != len(prompts) or latents.shape[-1] != channels
                or latents.shape[1] % self.config.patch_size or latents.shape[2] % self.config.patch_size):
            raise ValueError(f"latents {latents.shape}: expected ({len(prompts)}, h, w, {channels}), channels "
                             f"last, h and w multiples of patch_size={self.config.patch_size}")
        guided = guidance_scale > 1.0
        text, mask, null_text, null_mask = self.encode_prompts(prompts, negative_prompt if guided else "")
        dtype = jnp.dtype(self.config.compute_dtype)
        clean = sample_latents(
            self.params, self.config, latents, jnp.asarray(text, dtype), jnp.asarray(mask),
            jnp.asarray(null_text, dtype), jnp.asarray(null_mask), jnp.float32(guidance_scale),
            num_steps=int(num_inference_steps), guided=guided, shift=self.shift, solver=self.solver)
        return np.asarray(self.autoencoder.decode(clean), np.float32)


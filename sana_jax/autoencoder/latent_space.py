"""Latent spaces: the `Autoencoder` interface and `DCAE`, a DC-AE as one, with optional tiled decoding.

The interface is the part of diffusers' `AutoencoderDC` that training and sampling use, channels-last:
`encode(images (B, H, W, 3) in [0, 1]) -> latents (B, H/f, W/f, C)` already multiplied by the scaling
factor, and `decode(latents) -> images` clamped to [0, 1], with `downsample` = f. The shapes domain's
pixel-patch latent spaces implementing it are in `sana_jax.autoencoder.patch`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from sana_jax.autoencoder import convert, dc_ae, tiling
from sana_jax.autoencoder.config import DCAEConfig

Array = Any  # numpy or jax array


class Autoencoder(Protocol):
    """What the pipelines, tools and samplers need from an autoencoder."""

    @property
    def latent_channels(self) -> int: ...

    @property
    def downsample(self) -> int: ...

    @property
    def scaling_factor(self) -> float: ...

    def encode(self, images: Array) -> Array: ...

    def decode(self, latents: Array) -> Array: ...


class DCAE:
    """Images (B, H, W, 3) in [0, 1] <-> scaled latents (B, H/f, W/f, latent_channels), f = `downsample`.

    `encode` maps images to [-1, 1], encodes and multiplies by `scaling_factor`; `decode` divides by it,
    decodes and maps back to [0, 1] (clipped). The networks run jitted (one compile per input shape).
    """

    def __init__(self, config: DCAEConfig, params: dict):
        self.config = config
        self.params = params
        self.latent_channels = config.latent_channels
        self.downsample = config.downsample
        self.scaling_factor = config.scaling_factor

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> DCAE:
        """Loads a diffusers `AutoencoderDC` folder (config.json + *.safetensors)."""
        return cls(*convert.load_diffusers(path))

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [0, 1] (or uint8), H and W multiples of `downsample` -> scaled latents, float32."""
        images = jnp.asarray(images)
        if images.dtype == jnp.uint8:
            images = images / 255.0
        return dc_ae.encode(self.params, self.config, images * 2 - 1) * self.scaling_factor

    def decode(self, latents: jax.Array, tile: int | None = None, overlap: int | None = None) -> jax.Array:
        """Scaled latents (B, h, w, C) -> images (B, h*f, w*f, 3) in [0, 1], float32.

        With `tile` (in latents), decodes tile x tile pieces that share at least `overlap` latents
        (default tile // 4) with their neighbours and blends the shared pixels linearly
        (`sana_jax.autoencoder.tiling`). Tiling bounds memory; since the decoder's attention is global,
        tiled output differs slightly from whole-image decoding.
        """
        latents = jnp.asarray(latents) / self.scaling_factor
        decode_fn = lambda z: dc_ae.decode(self.params, self.config, z)
        if tile is None:
            images = decode_fn(latents)
        else:
            overlap = tile // 4 if overlap is None else overlap
            images = tiling.tiled_decode(decode_fn, latents, tile=tile, overlap=overlap,
                                         scale=self.downsample)
        return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)

"""Latent spaces: the autoencoder interface and an exact, parameter-free space-to-depth one.

The interface is the part of diffusers' `AutoencoderDC` that training and sampling use, channels-last:
`encode(images (B, H, W, 3) in [0, 1]) -> latents (B, H/f, W/f, C)` already multiplied by the scaling
factor, and `decode(latents) -> images` clamped to [0, 1], with `downsample` = f.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class SpaceToDepthAE:
    """An invertible "autoencoder" that folds each f x f pixel block into channels.

    Pixels in [0, 1] map to [-1, 1] as for DC-AE; latents are `(x - shift_factor) * scaling_factor`,
    whose defaults (measured on the shapes domain: pixel mean 0.71, std 0.33 in [-1, 1]) give latents
    of about zero mean and unit variance. Channel c of the latent holds pixel offset (dy, dx) and colour
    k with c = (dy * f + dx) * 3 + k. Works on numpy and jax arrays alike.
    """

    downsample: int = 4
    scaling_factor: float = 3.0
    shift_factor: float = 0.71

    def __post_init__(self):
        if not (isinstance(self.downsample, int) and self.downsample > 0):
            raise ValueError(f"downsample={self.downsample!r}: expected a positive integer")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor={self.scaling_factor!r}: expected a positive number")

    @property
    def latent_channels(self) -> int:
        return 3 * self.downsample**2

    def encode(self, images: Array) -> Array:
        """(B, H, W, 3) float in [0, 1] (or uint8) -> latents (B, H/f, W/f, 3 f^2) float32."""
        f = self.downsample
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"expected images (B, H, W, 3) with H and W divisible by {f}, "
                             f"got {images.shape}")
        if images.dtype == np.uint8:
            images = images / 255.0
        b, h, w, _ = images.shape
        x = (images.astype(np.float32) * 2.0 - 1.0 - self.shift_factor) * self.scaling_factor
        x = x.reshape(b, h // f, f, w // f, f, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // f, w // f, 3 * f * f)

    def decode(self, latents: Array) -> Array:
        """Latents (B, h, w, 3 f^2) -> images (B, h f, w f, 3) float32 clamped to [0, 1]."""
        f = self.downsample
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents (B, h, w, {self.latent_channels}), got {latents.shape}")
        b, h, w, _ = latents.shape
        x = latents.astype(np.float32).reshape(b, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h * f, w * f, 3) / self.scaling_factor + self.shift_factor
        return ((x + 1.0) / 2.0).clip(0.0, 1.0)

"""Pixel-patch latent spaces of the shapes domain: exact space-to-depth and its patch-PCA reduction.

Both implement `sana_jax.autoencoder.Autoencoder` on numpy and jax arrays alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

Array = Any  # numpy or jax array


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


@functools.lru_cache(maxsize=8)
def _patch_basis(downsample: int, channels: int, fit_samples: int, fit_seed: int,
                 resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3 f^2,) and the top `channels` principal directions (3 f^2, channels) of the space-to-depth
    latents of `fit_samples` shapes renders; each direction's sign makes its largest entry positive."""
    from sana_jax.data import shapes

    images = np.stack([shapes.make_sample(fit_seed, i, size=resolution).image for i in range(fit_samples)])
    patches = np.asarray(SpaceToDepthAE(downsample).encode(images), np.float64).reshape(-1, 3 * downsample**2)
    mean = patches.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(patches - mean, rowvar=False))
    basis = vectors[:, ::-1][:, :channels]
    basis *= np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(channels)])
    return mean.astype(np.float32), basis.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PatchPCAAE:
    """A linear autoencoder: the `channels` principal components of each f x f space-to-depth patch.

    The basis is fitted on the shapes domain (`fit_samples` renders of domain seed `fit_seed`, a seed
    training does not read). The projection is orthonormal, so a latent's signal-to-noise ratio at a given
    sigma is that of the space-to-depth latent it comes from; what it drops is the per-pixel detail that
    the domain's flat shapes do not have (16 of 48 components keep 97 % of the variance, and the checker
    accepts the decoded ground truth as it does the renders: docs/shapes_model.md). A denoiser then has 16
    numbers per token to produce instead of 48, and residual noise decodes to smooth patch patterns rather
    than speckle.
    """

    downsample: int = 4
    channels: int = 16
    fit_samples: int = 2000
    fit_seed: int = 7919
    resolution: int = 32

    def __post_init__(self):
        if not 1 <= self.channels <= 3 * self.downsample**2:
            raise ValueError(f"channels={self.channels!r}: expected 1 to {3 * self.downsample**2} for "
                             f"downsample={self.downsample}")

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def scaling_factor(self) -> float:
        return SpaceToDepthAE(self.downsample).scaling_factor

    def _basis(self) -> tuple[np.ndarray, np.ndarray]:
        return _patch_basis(self.downsample, self.channels, self.fit_samples, self.fit_seed, self.resolution)

    def encode(self, images: Array) -> Array:
        """(B, H, W, 3) float in [0, 1] (or uint8) -> latents (B, H/f, W/f, channels) float32."""
        mean, basis = self._basis()
        return (SpaceToDepthAE(self.downsample).encode(images) - mean) @ basis

    def decode(self, latents: Array) -> Array:
        """Latents (B, h, w, channels) -> images (B, h f, w f, 3) float32 clamped to [0, 1]."""
        if latents.ndim != 4 or latents.shape[-1] != self.channels:
            raise ValueError(f"expected latents (B, h, w, {self.channels}), got {latents.shape}")
        mean, basis = self._basis()
        return SpaceToDepthAE(self.downsample).decode(latents.astype(np.float32) @ basis.T + mean)

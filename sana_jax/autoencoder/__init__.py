"""Latent spaces: the `Autoencoder` interface, DC-AE (diffusers `AutoencoderDC`) in JAX and pixel patches.

Modules: `config`, `dc_ae` (the networks), `convert` (weights), `tiling` (tiled decoding), `latent_space`
(the interface and `DCAE`), `patch` (the shapes domain's `SpaceToDepthAE` and `PatchPCAAE`).
"""

from sana_jax.autoencoder.config import F32C32_SANA, DCAEConfig
from sana_jax.autoencoder.convert import load_diffusers, params_from_state_dict
from sana_jax.autoencoder.dc_ae import decode, encode, init_params
from sana_jax.autoencoder.latent_space import DCAE, Autoencoder
from sana_jax.autoencoder.patch import PatchPCAAE, SpaceToDepthAE
from sana_jax.autoencoder.tiling import tiled_decode

__all__ = [
    "Autoencoder",
    "DCAE",
    "DCAEConfig",
    "F32C32_SANA",
    "PatchPCAAE",
    "SpaceToDepthAE",
    "decode",
    "encode",
    "init_params",
    "load_diffusers",
    "params_from_state_dict",
    "tiled_decode",
]

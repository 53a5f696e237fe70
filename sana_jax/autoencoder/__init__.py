"""DC-AE (diffusers `AutoencoderDC`) in JAX: modules, weight conversion, tiled decoding, latent space."""

from sana_jax.autoencoder.config import F32C32_SANA, DCAEConfig
from sana_jax.autoencoder.convert import load_diffusers, params_from_state_dict
from sana_jax.autoencoder.dc_ae import decode, encode, init_params
from sana_jax.autoencoder.latent_space import DCAE
from sana_jax.autoencoder.tiling import tiled_decode

__all__ = [
    "DCAE",
    "DCAEConfig",
    "F32C32_SANA",
    "decode",
    "encode",
    "init_params",
    "load_diffusers",
    "params_from_state_dict",
    "tiled_decode",
]

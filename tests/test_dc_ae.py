"""DC-AE against diffusers' `AutoencoderDC` on tiny random models (CPU, float32), plus tiled decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC

from sana_jax.autoencoder import (
    DCAE,
    DCAEConfig,
    decode,
    encode,
    load_diffusers,
    params_from_state_dict,
    tiled_decode,
)
from sana_jax.autoencoder.tiling import tile_starts

# Every block type, interpolate up-blocks, stride-2 conv down-blocks, one 5x5 multi-scale branch.
INTERPOLATE = dict(
    in_channels=3, latent_channels=8, attention_head_dim=8,
    encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
# Pixel (un)shuffle blocks, an empty first stage (in/out layers become down/up blocks), BatchNorm in the
# decoder (also inside attention), two multi-scale branches, attention without any, no latent shortcuts.
PIXEL_SHUFFLE = dict(
    in_channels=3, latent_channels=4, attention_head_dim=4,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 1),
    encoder_qkv_multiscales=((), (), (3, 5)), decoder_qkv_multiscales=((), (), ()),
    upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"), decoder_act_fns=("relu", "gelu", "silu"),
    encoder_out_shortcut=False, decoder_in_shortcut=False, decoder_conv_act_fn="silu", scaling_factor=0.5)
# Convolutions only: every output pixel depends on a bounded latent neighbourhood.
LOCAL = dict(
    in_channels=3, latent_channels=4, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
    upsample_block_type="interpolate", downsample_block_type="Conv", scaling_factor=0.41407)
# Latent radius of LOCAL's decoder: conv_in 1 + ResBlock 2 at 1x, then 1 + 2 + 1 pixels at 2x.
LOCAL_RADIUS = 5


def random_autoencoder(kwargs: dict, seed: int = 0) -> AutoencoderDC:
    """A diffusers AutoencoderDC with every parameter and BatchNorm statistic randomised."""
    torch.manual_seed(seed)
    model = AutoencoderDC(**kwargs).eval()
    with torch.no_grad():
        for name, value in model.named_parameters():
            if value.ndim == 1:  # Biases and norm scales (the convolutions are already random).
                value.uniform_(-0.5, 0.5)
                if "norm" in name and name.endswith("weight"):
                    value.add_(1.0)
        for name, value in model.named_buffers():
            if name.endswith("running_mean"):
                value.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                value.uniform_(0.5, 1.5)
    return model


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(actual, expected, rel: float = 1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= rel, f"max error {error:.3g} relative to the largest value"


@pytest.fixture(scope="module")
def models():
    """name -> (diffusers model, DCAEConfig, params converted from its state dict)."""
    out = {}
    for name, kwargs in (("interpolate", INTERPOLATE), ("pixel_shuffle", PIXEL_SHUFFLE), ("local", LOCAL)):
        model = random_autoencoder(kwargs)
        config = DCAEConfig.from_diffusers_config(dict(model.config))
        out[name] = model, config, params_from_state_dict(model.state_dict(), config)
    return out


# (model, image height, width): 4x4 images leave 2x2 = 4 <= head_dim positions at the attention stage,
# where diffusers switches to its quadratic form. The latent space tests reuse the first shape's compile.
PARITY_CASES = [("interpolate", 16, 24), ("interpolate", 4, 4), ("pixel_shuffle", 16, 16)]


@pytest.mark.parametrize("name,height,width", PARITY_CASES)
def test_encoder_matches_diffusers(models, name, height, width):
    model, config, params = models[name]
    images = np.random.default_rng(0).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(model.encoder(nchw(images)))
    assert_close(encode(params, config, images), expected)


@pytest.mark.parametrize("name,height,width", PARITY_CASES)
def test_decoder_matches_diffusers(models, name, height, width):
    model, config, params = models[name]
    f = config.downsample
    latents = np.random.default_rng(1).normal(size=(2, height // f, width // f, config.latent_channels))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        expected = nhwc(model.decoder(nchw(latents)))
    assert_close(decode(params, config, latents), expected)


def test_latent_space_from_save_pretrained_folder(models, tmp_path):
    model = models["interpolate"][0]
    model.save_pretrained(tmp_path)
    space = DCAE.from_pretrained(tmp_path)
    assert (space.latent_channels, space.downsample, space.scaling_factor) == (8, 2, 0.41407)

    images = np.random.default_rng(2).uniform(0, 1, (2, 16, 24, 3)).astype(np.float32)
    latents = space.encode(images)
    with torch.no_grad():
        expected = nhwc(model.encode(nchw(images * 2 - 1)).latent) * 0.41407
    assert_close(latents, expected)
    pixels = np.round(images * 255).astype(np.uint8)
    assert_close(space.encode(pixels), space.encode(pixels / np.float32(255)), rel=1e-6)

    latents = np.random.default_rng(3).normal(size=(2, 8, 12, 8)).astype(np.float32)
    with torch.no_grad():
        sample = model.decode(nchw(latents / 0.41407)).sample
    expected = nhwc((sample * 0.5 + 0.5).clamp(0, 1))
    assert_close(space.decode(latents), expected)


def test_load_diffusers_reads_config_and_weights(models, tmp_path):
    model, config, params = models["pixel_shuffle"]
    model.save_pretrained(tmp_path)
    loaded_config, loaded_params = load_diffusers(tmp_path)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)


def test_conversion_names_bad_keys(models):
    model, config, _ = models["interpolate"]
    state = dict(model.state_dict())
    del state["decoder.norm_out.bias"]
    state["encoder.conv_out.weight"] = torch.zeros(8, 16, 1, 1)
    state["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        params_from_state_dict(state, config)
    message = str(error.value)
    assert "missing key decoder.norm_out.bias (expected shape (8,))" in message
    assert "key encoder.conv_out.weight has shape (8, 16, 1, 1), expected (8, 16, 3, 3)" in message
    assert "unexpected key encoder.extra.weight of shape (3,)" in message


def test_config_from_diffusers_config():
    config = DCAEConfig.from_diffusers_config(
        {**INTERPOLATE, "_class_name": "AutoencoderDC", "encoder_block_out_channels": [8, 16]})
    assert config.decoder_norm_types == ("rms_norm", "rms_norm")
    assert config.encoder_block_out_channels == (8, 16)
    assert config.downsample == 2
    with pytest.raises(ValueError, match="unknown AutoencoderDC config keys \\['depth'\\]"):
        DCAEConfig.from_diffusers_config({**INTERPOLATE, "depth": 3})
    with pytest.raises(ValueError, match="decoder_block_types=\\('ResBlock', 'Attention'\\)"):
        DCAEConfig.from_diffusers_config({**INTERPOLATE, "decoder_block_types": ("ResBlock", "Attention")})
    with pytest.raises(ValueError, match="attention_head_dim=32"):
        DCAEConfig.from_diffusers_config({**INTERPOLATE, "attention_head_dim": 32})


def test_bad_input_shapes_are_named(models):
    _, config, params = models["interpolate"]
    with pytest.raises(ValueError, match=r"images of shape \(1, 15, 16, 3\): expected \(B, H, W, 3\)"):
        encode(params, config, jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 4, 3\): expected \(B, H, W, 8\)"):
        decode(params, config, jnp.zeros((1, 4, 4, 3)))


@pytest.mark.parametrize("size", [12, 20])
def test_decode_with_a_covering_tile_equals_untiled(models, size):
    _, config, params = models["interpolate"]
    space = DCAE(config, params)
    latents = np.random.default_rng(4).normal(size=(2, 8, 12, 8)).astype(np.float32)
    np.testing.assert_array_equal(space.decode(latents, tile=size), space.decode(latents))


def test_tiled_decode_matches_untiled_away_from_seams(models):
    _, config, params = models["local"]
    space = DCAE(config, params)
    latents = np.random.default_rng(5).normal(size=(1, 28, 28, 4)).astype(np.float32)
    tiled, whole = np.asarray(space.decode(latents, tile=16, overlap=4)), np.asarray(space.decode(latents))
    # Tiles [0, 16) and [12, 28) latents. Outside [16 - r, 12 + r) (with r = the decoder's latent radius)
    # a pixel gets weight from one tile only, and that tile's zero padding lies more than r away.
    seam = np.zeros(56, bool)
    seam[2 * (16 - LOCAL_RADIUS - 1):2 * (12 + LOCAL_RADIUS + 1)] = True
    far = ~seam[:, None] & ~seam[None, :]
    np.testing.assert_allclose(tiled[0][far], whole[0][far], rtol=0, atol=1e-5)
    assert np.abs(tiled[0][~far] - whole[0][~far]).max() > 1e-3  # The tiles did see their borders.


@jax.jit
def nearest_then_pointwise(latents: jax.Array) -> jax.Array:
    """A 4x decoder whose pixels depend on their own latent only: tiling must not change its output."""
    pixels = jnp.repeat(jnp.repeat(latents, 4, axis=1), 4, axis=2)
    return jnp.tanh(pixels[..., :3] * 2.0 + pixels[..., 3:])


@pytest.mark.parametrize("height,width,tile,overlap", [
    (10, 10, 4, 1),   # starts 0, 2, 4, 6: three tiles meet.
    (9, 14, 6, 2),    # uneven spacing, non-square.
    (8, 12, 4, 0),    # abutting tiles.
    (5, 11, 8, 3),    # tiled along the width only.
])
def test_tiled_blending_reproduces_a_pointwise_decoder(height, width, tile, overlap):
    latents = jnp.asarray(np.random.default_rng(6).normal(size=(2, height, width, 6)), jnp.float32)
    tiled = tiled_decode(nearest_then_pointwise, latents, tile=tile, overlap=overlap, scale=4)
    np.testing.assert_allclose(tiled, nearest_then_pointwise(latents), rtol=0, atol=1e-6)


def test_overlaps_blend_linearly():
    # A "decoder" that writes each pixel's column inside its own tile: the blend exposes the weights.
    scale, tile, overlap = 2, 6, 2
    local_column = lambda z: jnp.broadcast_to(
        jnp.arange(z.shape[2] * scale, dtype=jnp.float32)[None, None, :, None],
        (z.shape[0], z.shape[1] * scale, z.shape[2] * scale, 1))
    out = np.asarray(tiled_decode(local_column, jnp.zeros((1, 3, 10, 1)), tile=tile, overlap=overlap,
                                  scale=scale))[0, 0, :, 0]
    # Tiles start at latents 0 and 4: pixels 8..11 are shared; tile 0 gives x, tile 1 gives x - 8.
    shared = np.arange(8, 12)
    right_weight = (shared + 0.5 - 8) / 4
    expected = np.concatenate([np.arange(8), (1 - right_weight) * shared + right_weight * (shared - 8),
                               np.arange(12, 20) - 8])
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_tile_starts_cover_with_the_requested_overlap():
    for size in range(1, 40):
        for tile in range(1, 12):
            for overlap in range(tile):
                starts = tile_starts(size, tile, overlap)
                assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
                gaps = np.diff(starts)
                assert np.all(gaps > 0) and np.all(tile - gaps >= overlap), (size, tile, overlap, starts)


def test_tiled_decode_rejects_bad_tiles():
    with pytest.raises(ValueError, match="tile=4, overlap=4"):
        tiled_decode(nearest_then_pointwise, jnp.zeros((1, 8, 8, 6)), tile=4, overlap=4, scale=4)


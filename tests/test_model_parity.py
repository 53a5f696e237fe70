"""The JAX model against diffusers' SanaTransformer2DModel on the same random weights (CPU, fp32)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel

from sana_jax import convert, model, sampling

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=12, sample_size=8)
VARIANTS = {  # name: (qk_norm, patch size, interpolation_scale of the 2K/4K positional embedding)
    "sana1.5-p1": ("rms_norm_across_heads", 1, None),
    "sana1.5-p2": ("rms_norm_across_heads", 2, None),
    "sana1.0-p1": (None, 1, None),
    "sana1.0-p2": (None, 2, None),
    "sana1.5-p1-pe": ("rms_norm_across_heads", 1, 1.0),
    "sana1.0-p2-pe2": (None, 2, 2.0),
}
# bf16 compute against the fp32 reference, max |error| / max |reference|: measured 0.026 (sana1.5-p1),
# 0.011 (sana1.5-p2), 0.011 (sana1.0-p1), 0.007 (sana1.0-p2); bf16 keeps 8 mantissa bits (relative
# step 0.004), compounded over two blocks. fp32 against fp32 measured 7e-7 to 1.8e-6.
BF16_TOLERANCE = 0.05

_forward = jax.jit(model.forward, static_argnums=1)


def _rel_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _pair(name: str, tmp_path_factory):
    """(diffusers model, our config, our params) converted through a saved diffusers folder.

    Every parameter is random (diffusers starts some at zero or one): matrices with std 1/sqrt(fan-in),
    vectors with std 0.5, so activations keep the scale of a trained model.
    """
    qk_norm, patch, interpolation_scale = VARIANTS[name]
    torch.manual_seed(list(VARIANTS).index(name))
    reference = SanaTransformer2DModel(**TINY, qk_norm=qk_norm, patch_size=patch,
                                       interpolation_scale=interpolation_scale)
    with torch.no_grad():
        for p in reference.parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.5
            p.copy_(torch.randn_like(p) * std)
    folder = tmp_path_factory.mktemp(name)
    reference.save_pretrained(folder)
    config, params = convert.read_diffusers(folder)
    return reference.eval(), config, params


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def inputs():
    """A non-square 8x12 latent, batch 3 with text masks of 6, 3 and 1 valid tokens."""
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(3, 8, 12, 4)).astype(np.float32)
    timesteps = np.array([999.0, 500.0, 3.0], np.float32)
    text = rng.normal(size=(3, 6, 12)).astype(np.float32)
    mask = (np.arange(6)[None] < np.array([6, 3, 1])[:, None]).astype(np.int32)
    return latents, timesteps, text, mask


def _diffusers_velocity(reference, latents, timesteps, text, mask) -> np.ndarray:
    with torch.no_grad():
        out = reference(torch.from_numpy(latents).permute(0, 3, 1, 2),
                        encoder_hidden_states=torch.from_numpy(text), timestep=torch.from_numpy(timesteps),
                        encoder_attention_mask=torch.from_numpy(mask)).sample
    return out.permute(0, 2, 3, 1).numpy()


def test_forward_matches_diffusers(pair, inputs):
    reference, config, params = pair
    want = _diffusers_velocity(reference, *inputs)
    got = np.asarray(_forward(params, config, *inputs))
    assert got.shape == want.shape == inputs[0].shape
    assert _rel_error(got, want) <= 1e-5
    # Masked caption tokens do not matter (their -10000 bias leaves no weight): large values there
    # leave the output as it was.
    latents, timesteps, text, mask = inputs
    masked_text = np.where(mask[..., None] == 1, text, 100.0).astype(np.float32)
    masked = np.asarray(_forward(params, config, latents, timesteps, masked_text, mask))
    assert _rel_error(masked, want) <= 1e-5
    # A square latent of the config's sample_size: diffusers' stored positional table instead of a recomputed one.
    square = (latents[:, :, :8], timesteps, text, mask)
    assert _rel_error(np.asarray(_forward(params, config, *square)), _diffusers_velocity(reference, *square)) <= 1e-5


@pytest.mark.parametrize("name", ["sana1.5-p1", "sana1.0-p2"])
def test_bfloat16_compute_is_close(name, inputs, tmp_path_factory):
    reference, config, params = _pair(name, tmp_path_factory)
    want = _diffusers_velocity(reference, *inputs)
    got = np.asarray(_forward(params, dataclasses.replace(config, compute_dtype="bfloat16"), *inputs))
    assert got.dtype == np.float32
    assert _rel_error(got, want) <= BF16_TOLERANCE


@pytest.mark.parametrize("name", ["sana_600m", "sana_1600m", "sana1.5_1600m", "sana1.5_4800m"])
def test_parameter_count_matches_diffusers(name):
    config = model.preset(name)
    kwargs = {k: v for k, v in convert.config_to_diffusers(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = sum(p.numel() for p in SanaTransformer2DModel(**kwargs).parameters())
    shapes = jax.eval_shape(model.init_params, config, jax.random.key(0))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert ours == theirs
    expected = {"sana1.5_1600m": 1.605e9, "sana1.5_4800m": 4.72e9}.get(name)
    if expected is not None:
        assert abs(ours - expected) / expected < 2e-3


@pytest.mark.slow
def test_generate_matches_diffusers_cfg_loop(tmp_path_factory):
    """`generate` against diffusers' transformer + DPMSolverMultistepScheduler with CFG, 4 steps.

    Tolerance: the forward's ~1e-6 relative error, amplified by guidance (each step's velocity is
    (1 + g) v_c - g v_u, about 10x at g = 4.5) over 4 steps; measured 5.4e-5.
    """
    reference, config, params = _pair("sana1.5-p2", tmp_path_factory)
    rng = np.random.default_rng(1)
    text = rng.normal(size=(2, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int32)
    null_text = rng.normal(size=(5, 12)).astype(np.float32)
    null_mask = np.array([1, 0, 0, 0, 0], np.int32)
    key = jax.random.key(7)
    height, width, steps, scale = 4, 6, 4, 4.5
    got = sampling.generate(params, config, text, mask, null_text, null_mask, key, height=height, width=width,
                            num_steps=steps, guidance_scale=scale)

    noise = np.array(jax.random.normal(key, (2, height, width, config.in_channels), jnp.float32))
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    scheduler.set_timesteps(steps)
    both_text = torch.from_numpy(np.concatenate([np.stack([null_text] * 2), text]))
    both_mask = torch.from_numpy(np.concatenate([np.stack([null_mask] * 2), mask]))
    x = torch.from_numpy(noise).permute(0, 3, 1, 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = reference(torch.cat([x, x]), encoder_hidden_states=both_text, timestep=t.expand(4).float(),
                          encoder_attention_mask=both_mask).sample
            v_uncond, v_cond = v.chunk(2)
            x = scheduler.step(v_uncond + scale * (v_cond - v_uncond), t, x).prev_sample
    want = x.permute(0, 2, 3, 1).numpy()
    assert _rel_error(np.asarray(got), want) <= 2e-4

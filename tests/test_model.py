"""Model pieces against independent references, and the forward's contract (jit, vmap, grad, remat, errors).

Parity of the whole forward with diffusers is in test_model_parity.py.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.model import SanaConfig, forward, forward_with_hidden, init_params, logical_axes, preset
from sana_jax.model.transformer import (
    SanaTransformer,
    _dummy_inputs,
    layer_norm,
    timestep_embedding,
)

CONFIG = dataclasses.replace(preset("tiny"), depth=3)


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(0))
    # proj_out and the cross-attention output start at zero; make every weight count.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape)
                                          for leaf, k in zip(leaves, keys, strict=True)])
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 6, 10, 4)).astype(np.float32), np.array([999.0, 17.0], np.float32),
              rng.standard_normal((2, 5, 12)).astype(np.float32), np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    return params, inputs


def test_timestep_embedding_matches_float64_sinusoid():
    t = np.array([0.0, 1.0, 136.0, 999.0], np.float32)
    exponent = np.float32(-math.log(10000.0)) * np.arange(128, dtype=np.float32) / np.float32(128)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # correctly rounded, as the references
    angles = (t[:, None] * freqs[None]).astype(np.float64)  # the float32 angle, then an exact cos/sin
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)
    np.testing.assert_allclose(np.asarray(jax.jit(timestep_embedding)(t)), expected, atol=1e-6)


def test_layer_norm_matches_numpy():
    x = np.random.default_rng(2).standard_normal((3, 4, 16)).astype(np.float32) * 5 + 2
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(layer_norm(x), expected, atol=1e-5)


def test_forward_jits_vmaps_and_differentiates(model):
    params, (x, t, text, mask) = model
    out = jax.jit(forward)(params, CONFIG, x, t, text, mask)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # vmap over single examples equals the batched call.
    single = jax.vmap(lambda *a: forward(params, CONFIG, *(b[None] for b in a))[0])(x, t, text, mask)
    np.testing.assert_allclose(single, out, atol=1e-5)
    grads = jax.grad(lambda p: jnp.mean(forward(p, CONFIG, x, t, text, mask) ** 2))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["blocks"]["ff"]["conv_depth"]["kernel"]).max()) > 0


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_changes_nothing(model, remat):
    params, (x, t, text, mask) = model
    loss = lambda cfg: lambda p: jnp.mean(forward(p, cfg, x, t, text, mask) ** 2)
    ref_loss, ref_grads = jax.value_and_grad(loss(CONFIG))(params)
    got_loss, got_grads = jax.value_and_grad(loss(dataclasses.replace(CONFIG, remat=remat)))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_unrolled_block_loop_changes_nothing(model):
    params, (x, t, text, mask) = model
    loss = lambda cfg: lambda p: jnp.mean(forward(p, cfg, x, t, text, mask) ** 2)
    ref_loss, ref_grads = jax.value_and_grad(loss(dataclasses.replace(CONFIG, unroll_blocks=False)))(params)
    got_loss, got_grads = jax.value_and_grad(loss(dataclasses.replace(CONFIG, unroll_blocks=True)))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("unroll_blocks, loops", [(None, 0), (False, 1), (True, 0)])
def test_block_loop_is_unrolled_on_cpu_unless_asked_otherwise(model, unroll_blocks, loops):
    """The default (None) unrolls the blocks on the CPU backend these tests run on: no loop in the program."""
    params, (x, t, text, mask) = model
    config = dataclasses.replace(CONFIG, unroll_blocks=unroll_blocks)
    program = jax.jit(forward, static_argnums=1).lower(params, config, x, t, text, mask).as_text()
    assert program.count("stablehlo.while") == loops
    assert config.blocks_unrolled() == (loops == 0)


def test_unrolled_config_initialises_the_same_weights():
    """init_params goes through the scanned loop; the unrolled module's own init draws the same values."""
    config = dataclasses.replace(CONFIG, unroll_blocks=True)
    expected = nn.meta.unbox(SanaTransformer(config).init(jax.random.key(5), *_dummy_inputs(config))["params"])
    got = init_params(config, jax.random.key(5))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_splits_change_nothing(model):
    params, _ = model
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 10, 4)).astype(np.float32)
    t = np.array([999.0, 17.0, 500.0, 3.0, 250.0], np.float32)
    text = rng.standard_normal((5, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1] * 5, [1, 1, 0, 0, 0]])
    fwd = jax.jit(forward, static_argnums=1)
    expected = fwd(params, CONFIG, x, t, text, mask)
    # Parts of 2, 2 and 1 examples; more parts than examples run one example each.
    for splits in (3, 8):
        np.testing.assert_allclose(fwd(params, dataclasses.replace(CONFIG, batch_splits=splits), x, t, text, mask),
                                   expected, atol=1e-6)
    loss = lambda cfg: jax.jit(jax.value_and_grad(lambda p: jnp.mean(forward(p, cfg, x, t, text, mask) ** 2)))
    ref_loss, ref_grads = loss(CONFIG)(params)
    got_loss, got_grads = loss(dataclasses.replace(CONFIG, batch_splits=3))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_batch_splits_are_named():
    with pytest.raises(ValueError, match="SanaConfig.batch_splits=0: expected a positive integer"):
        dataclasses.replace(CONFIG, batch_splits=0)


def test_hidden_states_bracket_every_block(model):
    params, (x, t, text, mask) = model
    out, hidden = forward_with_hidden(params, CONFIG, x, t, text, mask)
    assert hidden.shape == (CONFIG.depth + 1, 2, 60, CONFIG.hidden)
    np.testing.assert_allclose(out, forward(params, CONFIG, x, t, text, mask), atol=1e-6)
    # A model cut after its first block sees the same residual stream up to there.
    one_block = jax.tree.map(lambda a: a[:1], params["blocks"])
    _, hidden_1 = forward_with_hidden({**params, "blocks": one_block}, dataclasses.replace(CONFIG, depth=1),
                                      x, t, text, mask)
    np.testing.assert_allclose(hidden_1, hidden[:2], atol=1e-6)


def test_masked_text_tokens_are_ignored(model):
    params, (x, t, text, mask) = model
    changed = text.copy()
    changed[0, 3:] = 100.0  # the masked tail of the first caption
    np.testing.assert_allclose(forward(params, CONFIG, x, t, changed, mask), forward(params, CONFIG, x, t, text, mask),
                               atol=1e-5)
    changed[0, 3] = np.nan
    changed[0, 4] = np.inf
    np.testing.assert_allclose(jax.jit(forward, static_argnums=1)(params, CONFIG, x, t, changed, mask),
                               forward(params, CONFIG, x, t, text, mask), atol=1e-5)


def test_bf16_params_and_compute_stay_close(model):
    params, (x, t, text, mask) = model
    reference = forward(params, CONFIG, x, t, text, mask)
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16", param_dtype="bfloat16")
    got = forward(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), config, x, t, text, mask)
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - reference).max() / jnp.abs(reference).max()) < 0.05


def test_every_weight_has_logical_axes():
    axes = logical_axes(CONFIG)
    shapes = jax.eval_shape(init_params, CONFIG, jax.random.key(0))
    for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                          jax.tree.leaves(shapes), strict=True):
        assert len(spec) == len(leaf.shape)
    assert axes["blocks"]["attn1"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")


@pytest.mark.parametrize("change, message", [
    ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"depth": 0}, "depth=0"),
    ({"cross_num_heads": 3}, "cross_num_heads"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"unroll_blocks": "yes"}, r"unroll_blocks='yes': expected True, False or None"),
])
def test_bad_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **change)


def test_bad_inputs_are_named(model):
    params, (x, t, text, mask) = model
    with pytest.raises(ValueError, match="channels"):
        forward(params, CONFIG, x[..., :3], t, text, mask)
    with pytest.raises(ValueError, match="patch_size=2"):
        forward(params, dataclasses.replace(CONFIG, patch_size=2), x[:, :5], t, text, mask)
    with pytest.raises(ValueError, match=r"text_mask holds \[0.5\]: expected 0/1"):
        forward(params, CONFIG, x, t, text, np.where(mask == 0, 0.5, 1.0))
    with pytest.raises(ValueError, match=r"latents has shape \(6, 10, 4\): expected \(B, H, W, C\)"):
        forward(params, CONFIG, x[0], t, text, mask)
    with pytest.raises(ValueError, match=r"timesteps has shape \(\): expected \(B,\)"):
        forward(params, CONFIG, x, t[0], text, mask)
    with pytest.raises(ValueError, match="text has batch 1, latents have 2"):
        forward(params, CONFIG, x, t, text[:1], mask[:1])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("sana_9000m")
    with pytest.raises(ValueError, match="unknown SanaConfig fields"):
        SanaConfig.from_dict({"depth": 2, "width": 3})

"""Growth, pruning, block importance and optimizer-state surgery on a 4-block "tiny" SANA model."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sana_jax import surgery
from sana_jax.model import forward, forward_with_hidden, init_params, preset
from sana_jax.optim import came

CONFIG = dataclasses.replace(preset("tiny"), depth=4)
OUTPUTS = (("attn1", "to_out", "kernel"), ("attn1", "to_out", "bias"), ("attn2", "to_out", "kernel"),
           ("attn2", "to_out", "bias"), ("ff", "conv_point", "kernel"))

_forward = jax.jit(forward)
_forward_with_hidden = jax.jit(forward_with_hidden)


def _key(seed):
    # "rbg" keys compile much faster than threefry ones on CPU; growth accepts either.
    return jax.random.key(seed, impl="rbg")


def _get(tree, names):
    for name in names:
        tree = tree[name]
    return tree


def _random_like(tree, seed, scale=1.0):
    """A tree of N(0, scale) float32 arrays shaped like `tree`."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), tree)


def _block_leaves(params):
    """{path names: np array (depth, ...)} of the stacked block weights."""
    flat = jax.tree_util.tree_flatten_with_path(params["blocks"])[0]
    return {tuple(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def _inputs(batch, seed):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, 8, 8, CONFIG.in_channels)).astype(np.float32)
    timesteps = np.floor(rng.uniform(0, 1000, batch)).astype(np.float32)
    text = rng.standard_normal((batch, 5, CONFIG.caption_channels)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 0, 0]] * batch, np.int32)
    return latents, timesteps, text, mask


@pytest.fixture(scope="module")
def params():
    # Every weight random, none zero (proj_out and attn2.to_out init to zero); RMSNorm scales near 1.
    shapes = jax.eval_shape(init_params, CONFIG, jax.random.key(0))
    draws = _random_like(shapes, 1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: 1 + 0.05 * x if path[-1].key == "scale" else 0.2 * x, draws)
    assert all(np.all(np.asarray(x) != 0) for x in jax.tree.leaves(params))
    return params


@pytest.fixture(scope="module")
def inputs():
    return _inputs(2, 2)


@pytest.fixture(scope="module")
def grown(params):
    return surgery.grow(params, CONFIG, target_depth=6, key=_key(3))


# Growth.

def test_partial_preservation_keeping_all_blocks_is_identity(params, inputs, grown):
    config, new = grown
    assert config == dataclasses.replace(CONFIG, depth=6)
    before = np.asarray(_forward(params, CONFIG, *inputs))
    after = np.asarray(_forward(new, config, *inputs))
    assert before.std() > 0.1
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_partial_preservation_keeps_weights_and_draws_sana_init(params, grown):
    _, new = grown
    old, blocks = _block_leaves(params), _block_leaves(new)
    for names, leaf in blocks.items():
        np.testing.assert_array_equal(leaf[:4], old[names], err_msg=str(names))
    for names in OUTPUTS:
        np.testing.assert_array_equal(blocks[names][4:], 0.0, err_msg=str(names))
    for names in [("attn1", "norm_q", "scale"), ("attn2", "norm_k", "scale")]:
        np.testing.assert_array_equal(blocks[names][4:], 1.0)
    for names in [("attn2", "to_q", "bias"), ("attn2", "to_v", "bias")]:
        np.testing.assert_array_equal(blocks[names][4:], 0.0)
    for names, std in [(("attn1", "to_q", "kernel"), 0.02), (("ff", "conv_inverted", "kernel"), 0.02),
                       (("scale_shift_table",), 0.02), (("ff", "conv_depth", "kernel"), 0.2)]:
        fresh = blocks[names][4:]
        assert abs(fresh.std() / std - 1) < 0.2 and abs(fresh.mean()) < 0.3 * std, names
        assert not np.array_equal(fresh[0], fresh[1]), names
    for key in ("patch_embed", "time_embed", "caption_projection", "caption_norm", "proj_out"):
        jax.tree.map(np.testing.assert_array_equal, new[key], params[key])


def test_partial_preservation_keeping_a_prefix_equals_the_truncated_model(params, inputs):
    config, new = surgery.grow(params, CONFIG, target_depth=6, keep=2, key=_key(4))
    short_config, short = surgery.prune(params, CONFIG, range(2))
    np.testing.assert_allclose(np.asarray(_forward(new, config, *inputs)),
                               np.asarray(_forward(short, short_config, *inputs)), rtol=0, atol=1e-6)


def test_zeroed_outputs_of_new_blocks_get_gradients(grown, inputs):
    config, new = grown
    target = np.random.default_rng(5).standard_normal(inputs[0].shape).astype(np.float32)

    def loss(outputs):
        blocks = dict(new["blocks"])
        for (module, projection), value in outputs.items():
            blocks[module] = {**blocks[module], projection: value}
        return jnp.mean((forward({**new, "blocks": blocks}, config, *inputs) - target) ** 2)

    outputs = {(module, projection): new["blocks"][module][projection]
               for module, projection in [("attn1", "to_out"), ("attn2", "to_out"), ("ff", "conv_point")]}
    grads = jax.jit(jax.grad(loss))(outputs)
    for name, grad in grads.items():
        per_block = np.abs(np.asarray(grad["kernel"])[4:]).reshape(2, -1).max(axis=1)
        assert np.all(per_block > 1e-6), (name, per_block)


@pytest.mark.parametrize("strategy, target_depth, keep, sources, copies", [
    ("cyclic", 7, 3, [0, 1, 2, 0, 1, 2, 0], [3, 4, 5, 6]),
    ("block_expand", 6, 2, [0, 0, 0, 1, 1, 1], [1, 2, 4, 5]),
])
@pytest.mark.parametrize("zero_copies", [False, True])
def test_copy_strategies_order_blocks(params, strategy, target_depth, keep, sources, copies, zero_copies):
    config, new = surgery.grow(params, CONFIG, target_depth=target_depth, strategy=strategy, keep=keep,
                               zero_copies=zero_copies)
    assert config.depth == target_depth
    old, blocks = _block_leaves(params), _block_leaves(new)
    for names, leaf in blocks.items():
        assert leaf.shape == (target_depth, *old[names].shape[1:])
        for i, source in enumerate(sources):
            zeroed = zero_copies and i in copies and names in OUTPUTS
            np.testing.assert_array_equal(leaf[i], 0.0 if zeroed else old[names][source],
                                          err_msg=f"{names} block {i}")


def test_block_expand_with_zeroed_copies_equals_the_truncated_model(params, inputs):
    config, new = surgery.grow(params, CONFIG, target_depth=4, strategy="block_expand", keep=2,
                               zero_copies=True)
    short_config, short = surgery.prune(params, CONFIG, [0, 1])
    np.testing.assert_allclose(np.asarray(_forward(new, config, *inputs)),
                               np.asarray(_forward(short, short_config, *inputs)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_depth=3), "target_depth=3 is smaller than keep=4"),
    (dict(target_depth=8, keep=5), r"keep=5 must be in \[1, depth=4\]"),
    (dict(target_depth=8, strategy="copy"), "unknown growth strategy 'copy'"),
    (dict(target_depth=7, strategy="block_expand"), "target_depth=7 to be a multiple of keep=4"),
    (dict(target_depth=8, zero_copies=True), "zero_copies=True applies to"),
    (dict(target_depth=8), "pass a PRNG key"),
])
def test_grow_rejects_bad_arguments(params, kwargs, message):
    with pytest.raises(ValueError, match=message):
        surgery.grow(params, CONFIG, **kwargs)


# Pruning.

def test_prune_keeping_every_block_is_a_no_op(params):
    config, new = surgery.prune(params, CONFIG, range(4))
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, new, params)


def test_prune_equals_a_model_assembled_from_the_kept_blocks(params, inputs):
    keep = [1, 3]
    config, new = surgery.prune(params, CONFIG, keep)
    assembled = {**params, "blocks": jax.tree.map(lambda x: np.asarray(x)[keep], params["blocks"])}
    reference_config = dataclasses.replace(CONFIG, depth=2)
    np.testing.assert_array_equal(np.asarray(_forward(new, config, *inputs)),
                                  np.asarray(_forward(assembled, reference_config, *inputs)))


@pytest.mark.parametrize("keep, message", [
    ([], "keep_blocks is empty"),
    ([0, 2, 2], r"lists blocks \[2\] more than once"),
    ([0, 4], r"keep_blocks \[4\] are outside \[0, depth=4\)"),
    ([-1], r"keep_blocks \[-1\] are outside"),
])
def test_prune_rejects_bad_blocks(params, keep, message):
    with pytest.raises(ValueError, match=message):
        surgery.prune(params, CONFIG, keep)


def test_most_important_blocks_keeps_model_order():
    assert surgery.most_important_blocks([0.3, 0.01, 0.5, 0.2, 0.4], 3) == [0, 2, 4]
    assert surgery.most_important_blocks([0.1, 0.1, 0.1], 2) == [0, 1]
    with pytest.raises(ValueError, match=r"n=4 must be in \[1, depth=3\]"):
        surgery.most_important_blocks([0.1, 0.2, 0.3], 4)


# Block importance.

def _batch(batch, seed):
    latents, _, text, mask = _inputs(batch, seed)
    return {"latents": latents, "text": text, "text_mask": mask}


def _numpy_cosines(hidden):
    h = np.asarray(hidden, np.float64)
    cos = np.sum(h[:-1] * h[1:], -1) / (np.linalg.norm(h[:-1], axis=-1) * np.linalg.norm(h[1:], axis=-1))
    return cos.reshape(cos.shape[0], -1)  # (depth, tokens)


def test_block_importance_matches_numpy_on_the_hidden_states(params):
    batches = [_batch(2, 10), _batch(2, 11)]
    timesteps = [0, 600]
    got = surgery.block_importance_per_timestep(params, CONFIG, batches, timesteps=timesteps, noise_seed=7,
                                                progress=False)
    expected = np.zeros((len(timesteps), CONFIG.depth))
    for row, t in enumerate(timesteps):
        cosines = []
        for index, batch in enumerate(batches):
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(7), index), batch["latents"].shape)
            noisy = (1 - t / 1000) * batch["latents"] + t / 1000 * np.asarray(noise)
            _, hidden = _forward_with_hidden(params, CONFIG, jnp.asarray(noisy), jnp.full((len(noisy),), t),
                                             batch["text"], batch["text_mask"])
            cosines.append(_numpy_cosines(hidden))
        expected[row] = 1 - np.concatenate(cosines, axis=1).mean(axis=1)
    assert got.shape == (2, 4) and np.all(expected > 1e-3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    mean = surgery.block_importance(params, CONFIG, batches, timesteps=timesteps, noise_seed=7,
                                    progress=False)
    np.testing.assert_allclose(mean, expected.mean(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_block_importance_on_samples_follows_an_euler_loop(params, guidance):
    """Re-derived with an explicit Euler loop: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_guided(x_i, t_i), and at
    every x_i the cosines of the conditional forward's stream."""
    rng = np.random.default_rng(30)
    text = rng.standard_normal((3, 5, CONFIG.caption_channels)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    null_text, null_mask = np.zeros((5, CONFIG.caption_channels), np.float32), np.zeros((5,), np.int32)
    got, timesteps = surgery.block_importance_on_samples(
        params, CONFIG, text, mask, null_text, null_mask, height=4, width=4, num_steps=3, guidance_scale=guidance,
        shift=3.0, solver="euler", batch_size=2, noise_seed=5, progress=False)
    # shift 3 of 1 - linspace(1, 0.001, 4)[:3]
    sigmas = np.array([3 * s / (1 + 2 * s) for s in (0.999, 0.666, 0.333)] + [0.0], np.float32)
    np.testing.assert_allclose(timesteps, np.floor(sigmas[:-1] * np.float32(1000)))
    cosines = []
    for index, rows in enumerate((slice(0, 2), slice(2, 3))):
        x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(5), index),
                                         (len(text[rows]), 4, 4, CONFIG.in_channels)), np.float64)
        per_step = []
        for i, t in enumerate(timesteps):
            ts = jnp.full((len(x),), t, jnp.float32)
            v_cond, hidden = _forward_with_hidden(params, CONFIG, jnp.asarray(x, jnp.float32), ts, text[rows],
                                                  mask[rows])
            per_step.append(_numpy_cosines(hidden))
            null = (np.broadcast_to(null_text, text[rows].shape), np.broadcast_to(null_mask, mask[rows].shape))
            v_null = _forward(params, CONFIG, jnp.asarray(x, jnp.float32), ts, *null)
            v = np.asarray(v_null, np.float64) + guidance * (np.asarray(v_cond, np.float64) - np.asarray(v_null))
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        cosines.append(np.stack(per_step))  # (steps, depth, tokens)
    expected = 1 - np.concatenate(cosines, axis=2).mean(axis=2)
    assert got.shape == (3, 4) and np.all(expected > 1e-3)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_identity_block_scores_zero_and_is_pruned_first(params):
    blocks = jax.tree.map(lambda x: x, params["blocks"])  # a new tree: the fixture stays untouched
    for names in OUTPUTS:
        leaf = _get(blocks, names[:-1])
        leaf[names[-1]] = leaf[names[-1]].at[1].set(0.0)
    identity = {**params, "blocks": blocks}
    importance = surgery.block_importance(identity, CONFIG, [_batch(2, 12), _batch(2, 13)],
                                          timesteps=(200, 800), progress=False)
    assert importance[1] < 1e-6 and np.all(np.delete(importance, 1) > 1e-3), importance
    assert surgery.most_important_blocks(importance, 3) == [0, 2, 3]


def test_block_importance_of_a_constructed_stream_is_known_in_closed_form(params):
    """A zero patch kernel with bias e0 makes every token enter as e0. With the self-attention and FFN outputs
    and the cross-attention output kernel zeroed, block i adds its cross-attention output bias u_i to every
    token, so with u = (-2 e0, e0 + e1, 0, e0) the stream is e0 -> -e0 -> e1 -> e1 -> e0 + e1 whatever the
    latents, text and timestep, and BI_i = 1 - cos(h_i, h_i+1) = (2, 1, 0, 1 - 1/sqrt(2)): a block that
    negates the stream scores 2, a right-angle turn 1, an identity 0."""
    e = np.eye(CONFIG.hidden, dtype=np.float32)
    blocks = jax.tree.map(lambda x: x, params["blocks"])  # a new tree: the fixture stays untouched
    for names in OUTPUTS:
        leaf = _get(blocks, names[:-1])
        leaf[names[-1]] = jnp.zeros_like(leaf[names[-1]])
    blocks["attn2"]["to_out"]["bias"] = jnp.asarray(np.stack([-2 * e[0], e[0] + e[1], 0 * e[0], e[0]]))
    patch_embed = {"kernel": jnp.zeros_like(params["patch_embed"]["kernel"]), "bias": jnp.asarray(e[0])}
    constructed = {**params, "blocks": blocks, "patch_embed": patch_embed}
    got = surgery.block_importance_per_timestep(constructed, CONFIG, [_batch(2, 14)], timesteps=(0, 500, 999),
                                                progress=False)
    np.testing.assert_allclose(got, np.tile([2.0, 1.0, 0.0, 1 - np.sqrt(0.5)], (3, 1)), rtol=0, atol=1e-6)


def test_block_importance_rejects_bad_input(params):
    with pytest.raises(ValueError, match="batches is empty"):
        surgery.block_importance(params, CONFIG, [], progress=False)
    with pytest.raises(ValueError, match=r"timesteps=\[1200\]"):
        surgery.block_importance(params, CONFIG, [_batch(2, 0)], timesteps=[1200], progress=False)
    with pytest.raises(ValueError, match=r"latents have shape \(2, 8, 8, 3\)"):
        bad = {**_batch(2, 0), "latents": np.zeros((2, 8, 8, 3), np.float32)}
        surgery.block_importance(params, CONFIG, [bad], progress=False)


# Optimizer states.

OPTIMIZERS = {"adam": optax.adam(1e-2), "came": came(1e-2)}
# Jitted once per optimizer, so every tree shape compiles once in this module.
_INIT = {name: jax.jit(optimizer.init) for name, optimizer in OPTIMIZERS.items()}
_UPDATE = {name: jax.jit(optimizer.update) for name, optimizer in OPTIMIZERS.items()}
_apply_updates = jax.jit(optax.apply_updates)


def _run(name, params, grads_list):
    state = _INIT[name](params)
    for grads in grads_list:
        updates, state = _UPDATE[name](grads, state, params)
        params = _apply_updates(params, updates)
    return params, state


def _select(tree, keep):
    return {**tree, "blocks": jax.tree.map(lambda x: np.asarray(x)[keep], tree["blocks"])}


def _optimized(params):
    """The part of params the optimizer tests train: every block weight and one non-block weight."""
    return {"blocks": params["blocks"], "proj_out": params["proj_out"]}


@pytest.fixture(scope="module")
def gradients(params):
    return [_random_like(_optimized(params), seed) for seed in (20, 21)]


@pytest.fixture(scope="module")
def trained(params, gradients):
    """Per optimizer, (params, state) after two steps on `gradients`."""
    return {name: _run(name, _optimized(params), gradients) for name in OPTIMIZERS}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_optimizer_state_equals_the_pruned_models_state(params, gradients, trained, name):
    keep = [1, 3]
    full_params, full_state = trained[name]
    pruned_state = surgery.restack(full_state, surgery.pruning_plan(4, keep))
    pruned_gradients = [_select(g, keep) for g in gradients]
    ref_params, ref_state = _run(name, _select(_optimized(params), keep), pruned_gradients)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, pruned_state, ref_state)
    _, pruned_params = surgery.prune(full_params, CONFIG, keep)
    jax.tree.map(close, pruned_params, ref_params)


def test_grown_came_state_continues_old_blocks_and_starts_new_ones_fresh(grown, trained):
    _, new = grown
    _, state = trained["came"]
    grown_state = surgery.restack(state, surgery.growth_plan(4, target_depth=6))
    # Expected: the old state for the non-block weights and blocks 0-3, CAME's initial state for blocks 4-5.
    # CAME keeps every depth index of a stacked leaf independent, so the new blocks then step as if fresh.
    fresh = _INIT["came"](_optimized(new))
    flat_grown, treedef = jax.tree_util.tree_flatten_with_path(grown_state)
    assert treedef == jax.tree.structure(fresh)
    leaves = zip(flat_grown, jax.tree.leaves(state), jax.tree.leaves(fresh), strict=True)
    for (path, got), old, init in leaves:
        if "blocks" in jax.tree_util.keystr(path):
            expected = np.concatenate([np.asarray(old), np.asarray(init)[4:]])
        else:
            expected = np.asarray(old)
        np.testing.assert_array_equal(got, expected, err_msg=jax.tree_util.keystr(path))
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state[0])), "the old state is trained"


def test_zeroed_copies_start_with_zero_moments(trained):
    _, state = trained["adam"]
    plan = surgery.growth_plan(4, target_depth=6, strategy="cyclic", keep=3, zero_copies=True)
    mu = _block_leaves(surgery.restack(state, plan)[0].mu)
    old = _block_leaves(state[0].mu)
    for names, leaf in mu.items():
        expected = old[names][[0, 1, 2, 0, 1, 2]]
        if names in OUTPUTS:
            expected[3:] = 0.0
        np.testing.assert_array_equal(leaf, expected, err_msg=str(names))


# Sharding.

_SHARDED_SCRIPT = textwrap.dedent("""
    import dataclasses
    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from sana_jax import surgery
    from sana_jax.model import LOGICAL_AXIS_RULES, init_params, logical_axes, preset

    assert jax.device_count() == 8
    config = dataclasses.replace(preset("tiny"), depth=4)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = nn.logical_to_mesh_sharding(logical_axes(config), mesh, LOGICAL_AXIS_RULES)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    sharded = jax.device_put(params, shardings)
    assert sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings["blocks"])) >= 8
    outputs = [("attn1", "to_out"), ("attn2", "to_out"), ("ff", "conv_point")]

    def get(tree, names):
        for name in names:
            tree = tree[name]
        return tree

    def check(out, what, sources, zeroed=()):
        # Leaves keep the params' shardings; blocks[i] is old block sources[i] (zero outputs at zeroed).
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            names = [entry.key for entry in path]
            assert leaf.sharding.is_equivalent_to(get(shardings, names), leaf.ndim), (what, names)
            old = get(params, names)
            if names[0] != "blocks":
                np.testing.assert_array_equal(leaf, old)
                continue
            want = old[list(sources)]
            if tuple(names[1:3]) in outputs:
                want[list(zeroed)] = 0.0
            np.testing.assert_array_equal(np.asarray(leaf)[:len(sources)], want, err_msg=what)

    _, grown = surgery.grow(sharded, config, target_depth=6, key=jax.random.key(1))
    check(grown, "partial_preservation", [0, 1, 2, 3])
    assert not np.any(np.asarray(grown["blocks"]["attn2"]["to_out"]["kernel"])[4:])
    _, cyclic = surgery.grow(sharded, config, target_depth=6, strategy="cyclic", zero_copies=True)
    check(cyclic, "cyclic", [0, 1, 2, 3, 0, 1], zeroed=[4, 5])
    check(surgery.prune(sharded, config, [0, 3])[1], "prune", [0, 3])
    state = (optax.ScaleByAdamState(np.int32(3), sharded, sharded), optax.EmptyState())
    check(surgery.restack(state, surgery.pruning_plan(4, [2, 1]))[0].nu, "adam state", [2, 1])
    print("sharded surgery ok")
""")


@pytest.mark.slow
def test_surgery_keeps_shardings_on_8_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sharded surgery ok" in done.stdout

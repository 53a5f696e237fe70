"""The trainer: resume exactness, crash during a save, sharding equivalence, and bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from sana_jax import checkpoint
from sana_jax.data.pipeline import DataConfig
from sana_jax.model import init_params
from sana_jax.trainer import default_config, train, validate
from sana_jax.trainer.loop import model_config_for, model_metadata

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> ConfigDict:
    c = default_config()
    c.steps = 4
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.async_checkpointing = False
    c.model.overrides = {"depth": 2, "num_heads": 2, "head_dim": 8, "cross_num_heads": 2, "cross_head_dim": 8}
    c.optimizer.warmup_steps = 1
    c.sampling.num_prompts = 0
    c.eval_batches = 0
    for key, value in changes.items():
        target = c
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return c


def save_tiny_model(path: Path) -> Path:
    """A random model of `tiny_config()` saved at `path` with the metadata the trainer writes."""
    config = tiny_config()
    model_config = model_config_for(config, DataConfig.from_mapping(config.data))
    checkpoint.save(path, model_config, init_params(model_config, jax.random.key(0)), metadata=model_metadata(config))
    return path


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# The reference run of the loss and resume tests: long enough at this learning rate for the loss to fall.
RUN = {"steps": 12, "optimizer.lr": 1e-3}


def train_losses(workdir: Path) -> list[dict]:
    return [m for m in read_metrics(workdir) if "loss" in m]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """`RUN` in one go: the reference for the resume tests. It also logs the held-out loss at steps 0 and 12
    (fixed batches and noise: it changes only through the params), which leaves the training untouched."""
    workdir = tmp_path_factory.mktemp("straight")
    _, params = train(tiny_config(**RUN, eval_every=12, eval_batches=1), workdir)
    return workdir, params


def test_loss_falls_and_outputs_written(straight_run):
    workdir, params = straight_run
    assert [m["step"] for m in train_losses(workdir)] == list(range(1, 13))
    assert all(np.isfinite(m["loss"]) for m in train_losses(workdir))
    # The logged training losses are single batches at fresh noise levels (+-10 % without any learning), so
    # the fall is read from the held-out loss. Measured final / initial: 0.73 (seed 0), 0.80 and 0.76 (seeds 1
    # and 2); 0.90 at a tenth of the learning rate; 1 without learning.
    held_out = {m["step"]: m["eval_loss"] for m in read_metrics(workdir) if "eval_loss" in m}
    assert sorted(held_out) == [0, 12] and held_out[12] < 0.85 * held_out[0], held_out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "12"]  # the latest two
    config, saved = checkpoint.load(workdir / "model")
    assert config.depth == 2
    assert_trees_close(saved, params, atol=0)


def test_resume_equals_uninterrupted_run(straight_run, tmp_path):
    workdir, params = straight_run
    train(tiny_config(**{**RUN, "steps": 2}), tmp_path)  # stop after 2 steps (a checkpoint at 2)
    _, resumed = train(tiny_config(**RUN), tmp_path)  # the same command again, with the full step count
    assert_trees_close(resumed, params, atol=1e-6)
    first, second = train_losses(workdir), train_losses(tmp_path)
    assert [m["step"] for m in second] == list(range(1, 13))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_several_steps_per_call_train_as_one_per_call(straight_run, tmp_path):
    """`steps_per_call=4`: three calls of four steps make the same updates, held-out losses and (averaged over
    each call's four steps) logged losses as the reference's twelve calls of one step."""
    workdir, params = straight_run
    _, grouped = train(tiny_config(**RUN, eval_every=12, eval_batches=1, steps_per_call=4, log_every=4,
                                   checkpoint_every=4), tmp_path)
    assert_trees_close(grouped, params, atol=1e-6)
    reference = [m["loss"] for m in train_losses(workdir)]
    assert [m["step"] for m in train_losses(tmp_path)] == [4, 8, 12]
    np.testing.assert_allclose([m["loss"] for m in train_losses(tmp_path)],
                               np.mean(np.reshape(reference, (3, 4)), axis=1), rtol=1e-6)
    held_out = [[m["eval_loss"] for m in read_metrics(w) if "eval_loss" in m] for w in (workdir, tmp_path)]
    np.testing.assert_allclose(held_out[1], held_out[0], rtol=1e-6)


def test_time_budget_ends_the_stage_at_a_call_and_equals_a_run_of_that_many_steps(straight_run, tmp_path):
    """A budget spent before the first call ends returns after that call, as a run of its steps would: the same
    weights, logged losses and model/; the same command again finds the budget spent and trains no further, and
    a larger budget resumes it to the uninterrupted run's end."""
    grouped = {**RUN, "steps_per_call": 4, "log_every": 4, "checkpoint_every": 4}
    budgeted, reference = tmp_path / "budgeted", tmp_path / "four_steps"
    _, params = train(tiny_config(**grouped, time_budget_s=1e-9), budgeted)
    _, expected = train(tiny_config(**{**grouped, "steps": 4}), reference)
    assert_trees_close(params, expected, atol=0)
    assert [m["step"] for m in train_losses(budgeted)] == [4]
    assert [m["loss"] for m in train_losses(budgeted)] == [m["loss"] for m in train_losses(reference)]
    assert checkpoint.load_metadata(budgeted / "model")["step"] == 4
    assert sorted(p.name for p in (budgeted / "checkpoints").iterdir()) == ["4"]
    _, again = train(tiny_config(**grouped, time_budget_s=1e-9), budgeted)
    assert_trees_close(again, params, atol=0)
    assert [m["step"] for m in train_losses(budgeted)] == [4]
    _, resumed = train(tiny_config(**grouped, time_budget_s=1e9), budgeted)
    assert_trees_close(resumed, straight_run[1], atol=1e-6)
    assert [m["step"] for m in train_losses(budgeted)] == [4, 8, 12]
    assert checkpoint.load_metadata(budgeted / "model")["step"] == 12


def test_time_reserve_ends_the_stage_at_the_first_call_that_knows_its_pace(straight_run, tmp_path):
    """A reserve of more steps than any budget holds ends the stage after its third call, the first that finds
    a call after the compiling one done: the pace's first measure. A reserve of one step keeps the whole run."""
    workdir, _ = straight_run
    paired = {**RUN, "steps_per_call": 2, "log_every": 2, "checkpoint_every": 2, "time_budget_s": 1e9}
    train(tiny_config(**paired, time_reserve_steps=10**15), tmp_path / "reserved")
    reference = np.reshape([m["loss"] for m in train_losses(workdir)], (6, 2)).mean(axis=1)
    assert [m["step"] for m in train_losses(tmp_path / "reserved")] == [2, 4, 6]
    np.testing.assert_allclose([m["loss"] for m in train_losses(tmp_path / "reserved")], reference[:3], rtol=1e-6)
    assert checkpoint.load_metadata(tmp_path / "reserved" / "model")["step"] == 6
    train(tiny_config(**paired, time_reserve_steps=1), tmp_path / "one_step")
    assert [m["step"] for m in train_losses(tmp_path / "one_step")] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("changes, start, expected", [
    ({}, 0, 10),  # configs/pretrain.py: every interval a multiple of 10
    ({"eval_every": 0, "sample_every": 0}, 0, 10),  # 0: no interval
    ({"log_every": 25}, 0, 5),
    ({}, 1234, 2),  # resumed from a step that is not a multiple
    ({"steps_per_call": 1}, 0, 1),
])
def test_steps_per_call_divides_steps_intervals_and_start(changes, start, expected):
    from sana_jax.trainer.loop import steps_per_call

    config = tiny_config(**{"steps": 2700, "log_every": 50, "checkpoint_every": 500, "eval_every": 250,
                            "sample_every": 1000, "steps_per_call": 10, **changes})
    assert steps_per_call(config, start) == expected


@pytest.mark.slow
def test_kill_during_save_resumes_from_previous_checkpoint(straight_run, tmp_path):
    """SIGKILL while the step-4 checkpoint is being written: the rerun resumes from step 2."""
    workdir, params = straight_run
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_train import RUN, tiny_config
        from sana_jax.trainer import train

        import grain.checkpoint
        original = grain.checkpoint.CheckpointHandler.save
        def save_then_die(self, directory, *args, **kwargs):
            original(self, directory, *args, **kwargs)
            if any(part.split(".")[0] == "4" for part in directory.parts):  # step 4 is half written
                os.kill(os.getpid(), signal.SIGKILL)
        grain.checkpoint.CheckpointHandler.save = save_then_die
        train(tiny_config(**RUN), {str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    complete = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert "2" in complete and "4" not in complete
    _, resumed = train(tiny_config(**RUN), tmp_path)
    assert_trees_close(resumed, params, atol=1e-6)


def test_nonfinite_updates_are_skipped_then_stop(tmp_path):
    # An absurd learning rate makes the parameters overflow; every later gradient is non-finite.
    config = tiny_config(steps=12, **{"optimizer.name": "adamw", "optimizer.lr": 1e30,
                                      "max_nonfinite_in_a_row": 3, "checkpoint_every": 100})
    with pytest.raises(FloatingPointError, match="in a row had a non-finite"):
        train(config, tmp_path)
    metrics = read_metrics(tmp_path)
    assert any(m["skipped"] > 0 for m in metrics)


def test_held_out_loss_is_logged_on_a_disjoint_domain_seed(tmp_path):
    from sana_jax.data.pipeline import make_train_iterator
    from sana_jax.trainer.flow_matching import flow_matching_loss

    # Trained with unrolled blocks; the held-out loss program runs the scanned loop, the recomputation below
    # the unrolled one.
    config = tiny_config(eval_every=2, eval_batches=2, checkpoint_every=100,
                         **{"model.overrides.unroll_blocks": True})
    train(config, tmp_path)
    rows = [m for m in read_metrics(tmp_path) if "eval_loss" in m]
    assert [m["step"] for m in rows] == [0, 2, 4]
    # Step 4's value, recomputed: batches from domain seed 1 (training reads seed 0), no caption dropout,
    # batch k noised with fold_in(key(seed + 2), k).
    model_config, params = checkpoint.load(tmp_path / "model")
    held_out = {**config.data.to_dict(), "caption_dropout": 0.0, "domain_seed": 1}
    iterator = make_train_iterator(held_out, seed=config.seed + 1, batch_size=config.batch_size,
                                   process_index=0, process_count=1)
    losses = []
    for k in range(2):
        batch = {key: jnp.asarray(v) for key, v in next(iterator).items() if key != "prompt_id"}
        losses.append(flow_matching_loss(params, model_config, batch, jax.random.fold_in(jax.random.key(2), k),
                                         shift=config.training.shift))
    np.testing.assert_allclose(rows[-1]["eval_loss"], np.mean(losses), rtol=1e-5)
    assert rows[0]["eval_loss"] > rows[-1]["eval_loss"]


@pytest.mark.parametrize("change, message", [
    ({"model.nonsense": 1}, "unknown config field 'model.nonsense'"),
    ({"eval_every": -1}, "config.eval_every=-1"),
    ({"optimizer.name": "sgd"}, "optimizer.name='sgd'"),
    ({"batch_size": 6, "training.grad_accum": 4}, "batch_size=6"),
    ({"mesh.data": 3}, "mesh data=3"),
    ({"steps": 0}, "config.steps=0"),
    ({"data.resolutoin": 64}, "unknown data config keys"),
    ({"data.source": "array_record"}, "data_dir is required"),
    ({"optimizer.eight_bit_scheme": "fp4"}, "optimizer.eight_bit_scheme='fp4'"),
    ({"time_budget_s": -1.0}, "config.time_budget_s=-1.0"),
    ({"time_budget_s": 60.0, "optimizer.schedule": "cosine"}, "optimizer.schedule='constant'"),
    ({"time_reserve_steps": -5}, "config.time_reserve_steps=-5: expected an integer >= 0"),
])
def test_bad_configs_fail_before_compiling(change, message):
    config = tiny_config()
    with config.unlocked():
        for key, value in change.items():
            section, _, leaf = key.rpartition(".")
            (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config, num_devices=jax.device_count())


def test_missing_data_path_is_named(tmp_path):
    config = tiny_config(**{"data.source": "array_record"})
    with config.data.unlocked():
        config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        train(config, tmp_path / "run")


SHARDED_SCRIPT = """
import json, sys
import jax
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, {tests!r})
from test_train import tiny_config
from sana_jax.trainer import train

results = {{}}
for data, fsdp in [(1, 1), (8, 1), (2, 4), (1, 8)]:
    devices = 1 if (data, fsdp) == (1, 1) else 8
    # Two sub-batches on one device; a mesh of several devices splits the batch itself and drops them.
    config = tiny_config(steps=3, **{{"mesh.data": data, "mesh.fsdp": fsdp, "model.overrides.batch_splits": 2}})
    workdir = {workdir!r} + f"/{{data}}x{{fsdp}}"
    if devices == 1:
        # one device: a mesh of the first device only
        import sana_jax.trainer.sharding as sh
        original = sh.make_mesh
        sh.make_mesh = lambda d, f: jax.make_mesh((1, 1), sh.MESH_AXES, devices=jax.devices()[:1],
                                                  axis_types=(jax.sharding.AxisType.Auto,) * 2)
    _, params = train(config, workdir)
    if devices == 1:
        sh.make_mesh = original
    kernel = params["blocks"]["attn1"]["to_q"]["kernel"]
    losses = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")]
    results[f"{{data}}x{{fsdp}}"] = {{
        "losses": losses,
        "leaf": np.asarray(kernel).ravel()[:64].tolist(),
        "spec": str(kernel.sharding.spec) if hasattr(kernel.sharding, "spec") else "",
        "shard_shape": list(kernel.sharding.shard_shape(kernel.shape)),
    }}
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.slow
def test_sharded_meshes_match_one_device(tmp_path):
    script = SHARDED_SCRIPT.format(tests=str(ROOT / "tests"), workdir=str(tmp_path))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    reference = results.pop("1x1")
    for name, got in results.items():
        np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["leaf"], reference["leaf"], atol=1e-5, err_msg=name)
    # FSDP really shards the hidden width: (depth, D, D) kernels hold D / fsdp rows per device.
    assert results["2x4"]["shard_shape"] == [2, 16 // 4, 16]
    assert results["1x8"]["shard_shape"] == [2, 16 // 8, 16]
    assert results["8x1"]["shard_shape"] == [2, 16, 16]


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if config.data.source == "array_record":  # real-data configs name their shards on the command line
        config.data.data_dir = "/data/shards"
    validate(config, num_devices=8)
    for field in ("steps", "batch_size", "seed", "log_every", "checkpoint_every"):
        assert field in config
    assert "data" in config.mesh and "fsdp" in config.mesh


def test_ema_is_the_warmed_up_average_of_the_iterates():
    """EMA after each update t (from 0): e = d_t e + (1 - d_t) p with d_t = min(decay, (1 + t) / (10 + t))."""
    from sana_jax.data.pipeline import make_train_iterator
    from sana_jax.trainer.optimizers import learning_rate_schedule, make_optimizer
    from sana_jax.trainer.step import init_train_state, make_train_step

    config = tiny_config(**{"optimizer.name": "adamw", "optimizer.lr": 1e-2})
    model_config = model_config_for(config, DataConfig.from_mapping(config.data))
    tx = make_optimizer(config.optimizer, 4)
    step = jax.jit(make_train_step(model_config, tx, learning_rate_schedule(config.optimizer, 4), seed=0,
                                   noise_levels={"shift": 1.0}, grad_accum=1, ema_decay=0.5))
    state = init_train_state(init_params(model_config, jax.random.key(0)), tx, ema=True)
    batches = make_train_iterator(config.data.to_dict(), seed=0, batch_size=8, process_index=0, process_count=1)
    expected = jax.tree.map(np.asarray, state["params"])
    for t in range(4):
        state, _ = step(state, {k: jnp.asarray(v) for k, v in next(batches).items()})
        decay = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, 0.31: not yet at 0.5
        expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * np.asarray(p), expected, state["params"])
    assert_trees_close(state["ema_params"], expected, atol=1e-6)


# Optimizer state across surgery: growth.optimizer_state / prune.optimizer_state = "carry".

def _staged(stage: str, optimizer_state: str, **base_changes) -> ConfigDict:
    """A tiny staged run: a 3-step depth-2 base, then one step of `stage` ("growth" to depth 3)."""
    from sana_jax.trainer.config import growth_defaults, prune_defaults

    config = tiny_config(steps=1, checkpoint_every=1)
    with config.unlocked():
        config.base = tiny_config(steps=3, checkpoint_every=3, **base_changes)
        config[stage] = growth_defaults() if stage == "growth" else prune_defaults()
        config[stage].target_depth = 3 if stage == "growth" else 1
        config[stage].optimizer_state = optimizer_state
    return config


@pytest.mark.parametrize("stage, change, message", [
    ("growth", {"optimizer_state": "keep"}, "growth.optimizer_state='keep'"),
    ("growth", {"base_checkpoint": "/models/base"}, "holds weights only"),
    ("prune", {"base_checkpoint": "/models/base"}, "prune.optimizer_state='carry' needs the base trained"),
])
def test_bad_carry_configs_fail_before_compiling(stage, change, message):
    config = _staged(stage, "carry")
    config[stage].update(change)
    with pytest.raises(ValueError, match=message):
        validate(config, num_devices=jax.device_count())


def test_carry_needs_the_same_optimizer_in_both_stages():
    config = _staged("growth", "carry", **{"optimizer.name": "adamw"})
    with pytest.raises(ValueError, match="optimizer.name='came' differs from the base's 'adamw'"):
        validate(config, num_devices=jax.device_count())
    config = _staged("growth", "carry", **{"optimizer.name": "came_8bit", "optimizer.eight_bit_scheme": "sana"})
    config.optimizer.name = "came_8bit"
    with pytest.raises(ValueError, match="optimizer.eight_bit_scheme='dynamic' differs from the base's 'sana'"):
        validate(config, num_devices=jax.device_count())
    config = _staged("growth", "carry")  # CAME, then CAME-8bit (the main job)
    config.optimizer.name = "came_8bit"
    validate(config, num_devices=jax.device_count())


@pytest.mark.parametrize("name", ["came", "adamw"])
def test_carried_state_keeps_moments_and_restarts_the_schedule(name):
    from sana_jax import surgery
    from sana_jax.trainer.optimizers import carry_optimizer_state, make_optimizer

    config = tiny_config(**{"optimizer.name": name, "optimizer.warmup_steps": 5})
    tx = make_optimizer(config.optimizer, 10)
    rng = np.random.default_rng(0)
    params = {"blocks": {"kernel": jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)},
              "bias": jnp.zeros((8,), jnp.float32)}
    state = tx.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        _, state = tx.update(grads, state, params)
    plan = surgery.growth_plan(2, target_depth=3)
    grown = surgery.restack(state, plan)
    fresh = tx.init(surgery.restack(params, plan))
    carried = carry_optimizer_state(fresh, grown)
    schedule_counts = [x for x in jax.tree.leaves(carried.inner_state, is_leaf=lambda n: isinstance(
        n, optax.ScaleByScheduleState)) if isinstance(x, optax.ScaleByScheduleState)]
    assert [int(x.count) for x in schedule_counts] == [0]  # the new stage's warmup starts again
    assert int(carried.notfinite_count) == 0
    moments = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.inner_state) if np.ndim(x) > 0]
    for got, want in zip(moments(carried), moments(grown), strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(np.any(m != 0) for m in moments(carried))
    if name == "adamw":  # the bias correction's count goes with its moments
        assert int(carried.inner_state[1][0].count) == 3
    other = make_optimizer(tiny_config(**{"optimizer.name": "came" if name == "adamw" else "adamw"}).optimizer, 10)
    with pytest.raises(ValueError, match="does not fit this stage's optimizer"):
        carry_optimizer_state(other.init(surgery.restack(params, plan)), grown)


def test_came_state_carried_into_came_8bit_is_stored_in_8_bits():
    from sana_jax import surgery
    from sana_jax.optim import Quantized, dequantize_first_moment
    from sana_jax.trainer.optimizers import EIGHT_BIT_SCHEMES, carry_optimizer_state, make_optimizer

    rng = np.random.default_rng(1)
    # 128 x 160 = 20480 elements per layer: above CAME-8bit's 16384, so its first moment is stored in 8 bits.
    params = {"blocks": {"kernel": jnp.asarray(rng.normal(size=(2, 128, 160)), jnp.float32)}}
    came_tx = make_optimizer(tiny_config().optimizer, 10)
    state = came_tx.init(params)
    for _ in range(2):
        _, state = came_tx.update({"blocks": {"kernel": jnp.asarray(rng.normal(size=(2, 128, 160)), jnp.float32)}},
                                  state, params)
    plan = surgery.growth_plan(2, target_depth=3)
    grown = surgery.restack(state, plan)
    for scheme in ("dynamic", "sana"):
        tx = make_optimizer(tiny_config(**{"optimizer.name": "came_8bit",
                                           "optimizer.eight_bit_scheme": scheme}).optimizer, 10)
        carried = carry_optimizer_state(tx.init(surgery.restack(params, plan)), grown, eight_bit_scheme=scheme)
        mu = carried.inner_state[1][0].mu["blocks"]["kernel"]
        assert isinstance(mu, Quantized) and mu.codes.dtype == np.uint8
        decoded = np.asarray(dequantize_first_moment(mu, EIGHT_BIT_SCHEMES[scheme]))
        expected = np.asarray(grown.inner_state[1][0].mu["blocks"]["kernel"])
        assert np.abs(expected[:2]).max() > 0 and np.all(expected[2] == 0)
        # Within the codes' resolution: 1/255 of a block's range (min-max), a few % of the row absmax (dynamic).
        np.testing.assert_allclose(decoded.reshape(expected.shape), expected, atol=0.05 * np.abs(expected).max())
        np.testing.assert_array_equal(np.asarray(carried.inner_state[1][0].nu["blocks"]["kernel"].v_row),
                                      np.asarray(grown.inner_state[1][0].nu["blocks"]["kernel"].v_row))


def test_came_b3_from_the_config_sets_the_instability_decay():
    from sana_jax.trainer.optimizers import make_optimizer

    rng = np.random.default_rng(2)
    params = {"kernel": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)}
    grads = {"kernel": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)}
    res_rows = {}
    for b3 in (0.5, 0.9999):
        tx = make_optimizer(tiny_config(**{"optimizer.b3": b3}).optimizer, 10)
        _, state = tx.update(grads, tx.init(params), params)
        res_rows[b3] = np.asarray(state.inner_state[1][0].nu["kernel"].res_row)
    # From a zero state the first instability EMA is (1 - b3) times a value that does not depend on b3.
    assert np.all(res_rows[0.9999] > 0)
    np.testing.assert_allclose(res_rows[0.5] / res_rows[0.9999], 0.5 / 1e-4, rtol=1e-3)
    # A hand-written section without b3 or eight_bit_scheme (as in a notebook) takes SANA's b3 = 0.9999.
    section = tiny_config().optimizer.to_dict()
    del section["b3"], section["eight_bit_scheme"]
    tx = make_optimizer(ConfigDict(section), 10)
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(state.inner_state[1][0].nu["kernel"].res_row), res_rows[0.9999])


def _saved_state(checkpoints: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(checkpoints.absolute())
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


@pytest.mark.slow
def test_growth_carries_the_base_optimizer_state(tmp_path):
    """After one step of the grown stage, CAME's row/column statistics of the kept blocks are b2 = 0.999 times
    the base's final ones plus a positive term; a fresh state would hold the positive term alone. How each stage
    runs its model (here `batch_splits`) follows that stage's config."""
    from sana_jax.trainer import run

    config = _staged("growth", "carry", **{"model.overrides.batch_splits": 2})
    config.model.overrides.batch_splits = 1  # how a stage runs its model is its own, as in configs/grow.py
    run(config, tmp_path)
    assert checkpoint.load_config(tmp_path / "base" / "model").batch_splits == 2
    assert checkpoint.load_config(tmp_path / "model").batch_splits == 1
    base = _saved_state(tmp_path / "base" / "checkpoints", 3)["opt_state"]
    grown = _saved_state(tmp_path / "checkpoints", 1)["opt_state"]
    assert int(base["inner_state"][1][1]["count"]) == 3
    assert int(grown["inner_state"][1][1]["count"]) == 1  # the grown stage's own schedule, from step 0
    b2 = 0.999
    old, new = base["inner_state"][1][0]["nu"]["blocks"], grown["inner_state"][1][0]["nu"]["blocks"]
    checked = 0
    for path, after in jax.tree_util.tree_leaves_with_path(new):
        if not jax.tree_util.keystr(path).endswith(("['v_row']", "['v_col']")):
            continue
        before = old
        for entry in path:
            before = before[entry.key]
        before, kept = np.asarray(before), np.asarray(after)[:2]
        assert np.all(before > 0) and np.all(kept >= b2 * before * (1 - 1e-6)), jax.tree_util.keystr(path)
        checked += 1
    assert checked >= 8

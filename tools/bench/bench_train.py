"""Times the training step of a config: steps/s, images/s, achieved TFLOP/s and (on GPU) MFU.

The step is the trainer's own (flow-matching loss, optimizer, clipping, EMA) on one device, run as the trainer
runs it: `steps_per_call` steps of the config in each compiled call (`--config.steps_per_call=1`: one). By default
it is fed one synthetic batch of the data's shapes over and over, so that input reading is not measured; with
--data=pipeline the config's own data pipeline feeds every step, as in the trainer, and the difference between
the two is what reading and encoding the data costs the step (on a CPU host, its threads share the cores).

  python tools/bench/bench_train.py --config=configs/pretrain.py [--data=pipeline]
  python tools/bench/bench_train.py --config=configs/sana1_5_1600m.py --batch=8 --config.data.data_dir=... (GPU)
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sana_jax import cli
from sana_jax.benchmarking import median_ms
from sana_jax.data.pipeline import DataConfig, make_train_iterator
from sana_jax.model import init_params
from sana_jax.trainer.flow_matching import noise_levels
from sana_jax.trainer.loop import model_config_for
from sana_jax.trainer.optimizers import learning_rate_schedule, make_optimizer
from sana_jax.trainer.step import init_train_state, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "a training config")
_BATCH = flags.DEFINE_integer("batch", 0, "batch size (0: the config's)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (rounded up to whole calls)")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "pipeline"],
                          "what feeds the steps: one synthetic batch, or the config's data pipeline")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "the device's peak, for MFU (0: known GPUs only)")

# Dense bf16 peaks of the cards this project is measured on.
KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    batch_size = _BATCH.value or config.batch_size
    data_config = DataConfig.from_mapping(config.data)
    model_config = model_config_for(config, data_config)
    tx = make_optimizer(config.optimizer, config.steps)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    params = jax.jit(init_params, static_argnums=0)(model_config, jax.random.key(0))
    state = jax.jit(lambda p: init_train_state(p, tx, ema=config.training.ema_decay > 0))(params)
    train_step = make_train_step(model_config, tx, schedule, seed=0, noise_levels=noise_levels(config.training),
                                 grad_accum=config.training.grad_accum, ema_decay=config.training.ema_decay)
    per_call = config.steps_per_call
    steps_fn = jax.jit(functools.partial(jax.lax.scan, train_step), donate_argnums=0)
    side = model_config.sample_size
    if _DATA.value == "pipeline":  # whole batches, as the trainer passes them (the step picks its keys)
        batches = make_train_iterator(config.data, seed=0, batch_size=batch_size, process_index=0, process_count=1)

        def next_batches():
            chunk = [next(batches) for _ in range(per_call)]
            return {k: np.stack([b[k] for b in chunk]) for k in chunk[0]}
    else:
        rng = np.random.default_rng(0)
        text_len = 300 if model_config.caption_channels == 2304 else 16
        synthetic = {
            "latents": jnp.asarray(rng.standard_normal((batch_size, side, side, model_config.in_channels)),
                                   jnp.float32),
            "text": jnp.asarray(rng.standard_normal((batch_size, text_len, model_config.caption_channels)),
                                jnp.float32),
            "text_mask": jnp.ones((batch_size, text_len), jnp.int32),
        }
        synthetic = jax.tree.map(lambda x: jnp.broadcast_to(x, (per_call, *x.shape)), synthetic)

        def next_batches():
            return synthetic
    stacked = next_batches()

    start = time.perf_counter()
    compiled = steps_fn.lower(state, stacked).compile()
    compile_s = time.perf_counter() - start
    # One step's cost (XLA's analysis counts a loop's body once, whatever its trip count).
    cost = jax.jit(train_step).lower(state, jax.tree.map(lambda x: x[0], stacked)).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    carry = [state]

    def train_call():  # threads the donated state through back-to-back calls
        carry[0], metrics = compiled(carry[0], next_batches())
        return metrics

    calls = -(-_STEPS.value // per_call)
    seconds = median_ms(train_call, warmup=2, repeats=1, inner=calls) / 1e3 / per_call

    device = jax.devices()[0]
    peak = _PEAK_TFLOPS.value or next((v for k, v in KNOWN_PEAKS.items() if k in device.device_kind), 0.0)
    tflops = flops / seconds / 1e12
    print(f"device={device.device_kind} backend={jax.default_backend()} model={config.model.preset} "
          f"depth={model_config.depth} hidden={model_config.hidden} batch={batch_size} "
          f"latent={side}x{side} optimizer={config.optimizer.name} dtype={model_config.compute_dtype} "
          f"data={_DATA.value} steps_per_call={per_call} malloc={cli.malloc_in_use()}")
    print(f"{'compile s':>10} {'ms/step':>9} {'steps/s':>8} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    mfu = f"{tflops / peak:.1%}" if peak else "-"
    print(f"{compile_s:>10.1f} {seconds * 1e3:>9.1f} {1 / seconds:>8.2f} {batch_size / seconds:>9.1f} "
          f"{tflops:>8.4f} {mfu:>6}")


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    app.run(main)

"""Optimizer state memory on the real presets and jitted update time on a slice of one.

Memory comes from `state_bytes(jax.eval_shape(tx.init, params))`: nothing is allocated. The timing runs
one jitted update (preconditioner, weight decay, learning rate, apply) with donated params and state
on the first `--blocks` blocks of `--preset` plus its non-block weights, on the current backend.

  python tools/bench/bench_optim.py --preset=sana1.5_1600m --blocks=2
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from absl import app, flags

from sana_jax import cli
from sana_jax.benchmarking import median_ms
from sana_jax.model import preset
from sana_jax.model.transformer import init_params
from sana_jax.optim import SANA_SCHEME, came, state_bytes

MEMORY_PRESETS = ("sana1.5_1600m", "sana1.5_4800m")


def optimizers(lr: float = 1e-4) -> dict[str, optax.GradientTransformation]:
    return {
        "AdamW (optax)": optax.adamw(lr, weight_decay=0.01),
        "Adafactor (optax)": optax.adafactor(lr),
        "CAME fp32": came(lr, weight_decay=0.01),
        "CAME-8bit (dynamic, rows)": came(lr, weight_decay=0.01, eight_bit=True),
        "CAME-8bit (SANA min-max)": came(lr, weight_decay=0.01, eight_bit=True, scheme=SANA_SCHEME),
    }


def memory_table():
    names = list(optimizers())
    print(f"{'optimizer':28s}" + "".join(f"{p + ' B/param':>24s}{'GiB':>8s}" for p in MEMORY_PRESETS))
    shapes = {name: jax.eval_shape(init_params, preset(name), jax.random.key(0)) for name in MEMORY_PRESETS}
    counts = {name: sum(leaf.size for leaf in jax.tree.leaves(s)) for name, s in shapes.items()}
    for name in names:
        row = f"{name:28s}"
        for preset_name in MEMORY_PRESETS:
            total = state_bytes(jax.eval_shape(optimizers()[name].init, shapes[preset_name]))
            row += f"{total / counts[preset_name]:24.4f}{total / 2**30:8.2f}"
        print(row)
    print("parameters: " + ", ".join(f"{p} {counts[p] / 1e9:.3f} B" for p in MEMORY_PRESETS))


def time_updates(preset_name: str, blocks: int, repeats: int):
    config = dataclasses.replace(preset(preset_name), depth=blocks)
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), 2 * len(leaves))
    make = lambda offset: treedef.unflatten(
        [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys[offset::2], leaves, strict=True)])
    params, grads = make(0), make(1)
    count = sum(leaf.size for leaf in leaves)
    print(f"\n{preset_name} with {blocks} blocks: {count / 1e6:.1f} M parameters, "
          f"backend {jax.default_backend()}")
    print(f"{'optimizer':28s}{'ms / update':>14s}{'ns / param':>12s}")
    for name, tx in optimizers().items():
        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(step, donate_argnums=(0, 1))
        carry = [(jax.tree.map(lambda x: x.copy(), params), tx.init(params))]

        def update(step=step, carry=carry):  # threads the donated (params, state) through the calls
            carry[0] = step(*carry[0], grads)
            return carry[0]

        ms = median_ms(update, warmup=1, repeats=repeats)  # the warm-up call compiles
        print(f"{name:28s}{ms:14.1f}{1e6 * ms / count:12.2f}", flush=True)
        carry.clear()  # frees params and state before the next optimizer's


_PRESET = flags.DEFINE_string("preset", "sana1.5_1600m", "model preset whose blocks are timed")
_BLOCKS = flags.DEFINE_integer("blocks", 2, "how many of its blocks (plus the non-block weights)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed updates per optimizer")
_SKIP_MEMORY = flags.DEFINE_bool("skip_memory", False, "skip the state-memory table")


def main(argv):
    del argv
    if not _SKIP_MEMORY.value:
        memory_table()
    time_updates(_PRESET.value, _BLOCKS.value, _REPEATS.value)


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    app.run(main)

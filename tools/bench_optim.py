"""Optimizer state memory on the real presets and jitted update time on a slice of one.

Memory comes from `state_bytes(jax.eval_shape(tx.init, params))`: nothing is allocated. The timing runs
one jitted update (preconditioner, weight decay, learning rate, apply) with donated params and state
on the first `--blocks` blocks of `--preset` plus its non-block weights, on the current backend.

  python tools/bench_optim.py --preset=sana1.5_1600m --blocks=2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

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
        p, state = jax.tree.map(lambda x: x.copy(), params), tx.init(params)
        p, state = step(p, state, grads)  # compile
        jax.block_until_ready(p)
        times = []
        for _ in tqdm(range(repeats), desc=name, leave=False):
            start = time.perf_counter()
            p, state = step(p, state, grads)
            jax.block_until_ready((p, state))
            times.append(time.perf_counter() - start)
        ms = 1e3 * float(np.median(times))
        print(f"{name:28s}{ms:14.1f}{1e6 * ms / count:12.2f}", flush=True)
        del p, state


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sana1.5_1600m")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        memory_table()
    time_updates(args.preset, args.blocks, args.repeats)


if __name__ == "__main__":
    main()

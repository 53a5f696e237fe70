"""Training curves of CAME, CAME-8bit schemes and AdamW on a small SANA DiT with a flow-matching loss.

Fixed random data (smooth latents, random caption features), identical batches, noise and timesteps for
every optimizer. Prints the final losses and, for each 8-bit scheme, the bytes per element and the error
of the first moment of the float32 CAME run after training when stored in that scheme; plots the curves.

  python tools/experiments/optim_curves.py --preset=small --depth=2 --steps=200 --out=docs/optim_curves.png
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags
from tqdm import tqdm

from sana_jax import cli
from sana_jax.model import preset
from sana_jax.model.transformer import forward, init_params
from sana_jax.optim import SANA_SCHEME, Scheme, came, sana_factoring, state_bytes
from sana_jax.optim.came import SANA_MIN_8BIT_SIZE
from sana_jax.optim.quantize import dequantize_blockwise, quantize_blockwise

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCHEMES = {
    "sana-minmax-2048cols": SANA_SCHEME,
    "dynamic-row": Scheme("dynamic", block_size=None),
    "dynamic-256": Scheme("dynamic", block_size=256),
    "dynamic-64": Scheme("dynamic", block_size=64),
    "linear-256": Scheme("linear", block_size=256),
    "linear-row": Scheme("linear", block_size=None),
}


def make_data(config, key, num_samples: int, size: int, text_len: int):
    """Smooth latents (bilinear upsampling of 4x4 noise) and random caption features."""
    k_latent, k_text = jax.random.split(key)
    coarse = jax.random.normal(k_latent, (num_samples, 4, 4, config.in_channels))
    latents = jax.image.resize(coarse, (num_samples, size, size, config.in_channels), "bilinear")
    text = jax.random.normal(k_text, (num_samples, text_len, config.caption_channels))
    return latents, text


def flow_matching_loss(params, config, x0, text, noise, sigma):
    """MSE between the predicted velocity at x_t = (1 - s) x0 + s n and the target n - x0."""
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    timesteps = jnp.floor(sigma * 1000)
    mask = jnp.ones(text.shape[:2], jnp.int32)
    velocity = forward(params, config, x_t, timesteps, text, mask)
    return jnp.mean((velocity - (noise - x0)) ** 2)


def train(tx, params, config, data, batch_size: int, steps: int, seed: int):
    """Per-step losses (np.ndarray (steps,)), final params and optimizer state."""
    latents, text = data
    step_fn = jax.jit(lambda p, st, key: _step(tx, p, st, key, config, latents, text, batch_size))
    state = tx.init(params)
    losses = []
    keys = jax.random.split(jax.random.key(seed), steps)
    for key in tqdm(keys, desc="steps", leave=False):
        params, state, loss = step_fn(params, state, key)
        losses.append(float(loss))
    return np.asarray(losses), params, state


def _step(tx, params, state, key, config, latents, text, batch_size):
    k_index, k_noise, k_sigma = jax.random.split(key, 3)
    index = jax.random.choice(k_index, latents.shape[0], (batch_size,), replace=False)
    x0 = latents[index]
    noise = jax.random.normal(k_noise, x0.shape)
    sigma = jax.nn.sigmoid(jax.random.normal(k_sigma, (batch_size,)))  # logit-normal
    loss, grads = jax.value_and_grad(flow_matching_loss)(params, config, x0, text[index], noise, sigma)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


def moment_errors(mu, min_size: int) -> dict[str, dict[str, float]]:
    """How well each 8-bit scheme stores the float32 first moments of the layers above `min_size` elements:
    relative RMS error, median and 90th-percentile elementwise relative error, the fraction of non-zero
    entries stored as 0, and bytes per element."""
    big = []
    for path, m in jax.tree_util.tree_leaves_with_path(mu):
        factoring = sana_factoring(path, m.shape)
        if factoring.axes is not None and factoring.layer_size(m.shape) > min_size:
            big.append(m)
    out = {}
    for name, scheme in SCHEMES.items():
        q = [quantize_blockwise(m, scheme) for m in big]
        m = np.concatenate([np.ravel(x) for x in big])
        y = np.concatenate([np.ravel(dequantize_blockwise(x, scheme)) for x in q])
        relative = np.abs(y - m)[m != 0] / np.abs(m[m != 0])
        out[name] = {"rms": float(np.sqrt(np.sum((y - m) ** 2) / np.sum(m**2))),
                     "median": float(np.median(relative)), "p90": float(np.quantile(relative, 0.9)),
                     "flushed": float(np.mean(y[m != 0] == 0)), "bytes": state_bytes(q) / m.size}
    return out


_PRESET = flags.DEFINE_string("preset", "small", "model preset")
_DEPTH = flags.DEFINE_integer("depth", 2, "blocks (2 keeps a CPU run short)")
_STEPS = flags.DEFINE_integer("steps", 200, "training steps per optimizer")
_BATCH = flags.DEFINE_integer("batch", 8, "batch size")
_SIZE = flags.DEFINE_integer("size", 8, "latent height = width")
_TEXT_LEN = flags.DEFINE_integer("text_len", 8, "caption tokens")
_SAMPLES = flags.DEFINE_integer("samples", 64, "size of the fixed dataset")
_LR = flags.DEFINE_float("lr", 1e-4, "CAME learning rate (SANA's)")
_ADAMW_LR = flags.DEFINE_float("adamw_lr", 1e-3, "AdamW learning rate (3e-4 trains slower here)")
_SEED = flags.DEFINE_integer("seed", 0, "parameter and data seed")
_TRAIN_SCHEMES = flags.DEFINE_string("train_schemes", "sana-minmax-2048cols,dynamic-row,dynamic-256,linear-256",
                                     f"comma-separated 8-bit schemes to train with, from {list(SCHEMES)}")
_OUT = flags.DEFINE_string("out", "docs/optim_curves.png", "where the figure goes")


def main(argv: list[str]) -> None:
    del argv

    config = dataclasses.replace(preset(_PRESET.value), depth=_DEPTH.value)
    k_params, k_data = jax.random.split(jax.random.key(_SEED.value))
    params = init_params(config, k_params)
    data = make_data(config, k_data, _SAMPLES.value, _SIZE.value, _TEXT_LEN.value)
    optimizers = {"AdamW": optax.adamw(_ADAMW_LR.value, weight_decay=0.0), "CAME fp32": came(_LR.value)}
    optimizers |= {f"CAME-8bit {name}": came(_LR.value, eight_bit=True, scheme=SCHEMES[name])
                   for name in _TRAIN_SCHEMES.value.split(",")}

    curves, fp32_state = {}, None
    for name, tx in optimizers.items():
        start = time.perf_counter()
        curves[name], _, state = train(tx, params, config, data, _BATCH.value, _STEPS.value, _SEED.value + 1)
        if name == "CAME fp32":
            fp32_state = state
        print(f"{name:32s} final loss (mean of last 20 steps) {curves[name][-20:].mean():.5f}   "
              f"bytes/param {state_bytes(state) / sum(p.size for p in jax.tree.leaves(params)):.3f}   "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    print(f"\nFirst moment of the float32 CAME run after {_STEPS.value} steps, stored in 8 bits "
          f"(layers above {SANA_MIN_8BIT_SIZE} elements):")
    print(f"  {'scheme':22s}{'rel. RMS':>10s}{'median rel.':>13s}{'p90 rel.':>10s}{'flushed':>9s}{'B/elem':>8s}")
    for name, e in moment_errors(fp32_state[0].mu, SANA_MIN_8BIT_SIZE).items():
        print(f"  {name:22s}{e['rms']:10.4f}{e['median']:13.4f}{e['p90']:10.4f}{e['flushed']:9.4f}{e['bytes']:8.4f}")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=(3, 2))
    smooth = lambda x: np.convolve(x, np.ones(10) / 10, mode="valid")
    steps = np.arange(_STEPS.value - 9) + 10
    for i, (name, losses) in enumerate(curves.items()):
        style = dict(label=name, color=f"C{i}", linestyle="--" if name == "AdamW" else "-")
        top.plot(steps, smooth(losses), **style)
        if name.startswith("CAME-8bit"):
            bottom.plot(steps, 100 * (smooth(losses) / smooth(curves["CAME fp32"]) - 1), **style)
    top.set(ylabel="flow-matching loss (10-step mean)", yscale="log",
            title=f"{_PRESET.value} DiT, depth {_DEPTH.value}, {_SIZE.value}x{_SIZE.value} latents, "
                  f"batch {_BATCH.value}, lr {_LR.value:g} (AdamW {_ADAMW_LR.value:g})")
    bottom.set(xlabel="step", ylabel="loss vs CAME fp32 (%)")
    bottom.axhline(0.0, color="gray", linewidth=0.5)
    top.legend()
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=120)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.use_compilation_cache()
    app.run(main)

"""Block importance of a SANA model: prints a table and plots a bar chart and a timestep x block heatmap.

The model comes from an orbax checkpoint (`sana_jax.checkpoint.save`) or a preset with random weights;
the calibration batches from the built-in shapes domain (`sana_jax.data`) or random latents and text.

  python tools/block_importance.py --preset=small --out=block_importance.png
  python tools/block_importance.py --checkpoint=CKPT_DIR --num_batches=16 --keep=18
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sana_jax import checkpoint, cli, surgery
from sana_jax.model import SanaConfig, init_params, preset

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "orbax checkpoint directory written by sana_jax.checkpoint.save")
_PRESET = flags.DEFINE_string("preset", None, "a sana_jax.model preset with random weights")
_DATA = flags.DEFINE_enum("data", "shapes", ["shapes", "random"], "calibration data")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "calibration batches")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "samples per batch")
_TIMESTEPS = flags.DEFINE_string("timesteps", ",".join(map(str, surgery.DEFAULT_TIMESTEPS)),
                                 "comma-separated model timesteps in [0, 1000]")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "shapes: image size in pixels")
_DOWNSAMPLE = flags.DEFINE_integer("downsample", 4, "shapes: pixels per latent cell")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", 8, "random: latent grid side")
_TEXT_LENGTH = flags.DEFINE_integer("text_length", 16, "random: text tokens")
_SEED = flags.DEFINE_integer("seed", 0, "weights (preset) and data seed")
_NOISE_SEED = flags.DEFINE_integer("noise_seed", 0, "seed of the noise added to the calibration latents")
_KEEP = flags.DEFINE_integer("keep", None, "also print the KEEP most important blocks")
_OUT = flags.DEFINE_string("out", "block_importance.png", "PNG path of the plots")
flags.mark_flags_as_mutual_exclusive(["checkpoint", "preset"], required=True)


def shapes_batches(config: SanaConfig) -> tuple[SanaConfig, list[dict]]:
    """Batches of the shapes domain; a preset config is resized to the data's channels."""
    from sana_jax.data import pipeline

    text_dim = config.caption_channels if _CHECKPOINT.value else pipeline.DataConfig.text_dim
    # A trained model's latent space and text encoder come from its metadata.
    trained = checkpoint.load_metadata(_CHECKPOINT.value).get("data", {}) if _CHECKPOINT.value else {}
    data = pipeline.DataConfig.from_mapping({
        **trained, "source": "shapes", "resolution": _RESOLUTION.value, "downsample": _DOWNSAMPLE.value,
        "text_dim": text_dim, "domain_seed": _SEED.value})
    shapes = pipeline.element_shapes(data)
    channels = shapes["latents"][-1]
    if _CHECKPOINT.value and channels != config.in_channels:
        sys.exit(f"the checkpoint's model takes {config.in_channels} latent channels; shapes data with "
                 f"--downsample={_DOWNSAMPLE.value} gives {channels}")
    if not _CHECKPOINT.value:
        config = dataclasses.replace(config, in_channels=channels, out_channels=channels,
                                     caption_channels=shapes["text"][-1])
    dataset = pipeline.make_dataset(data, seed=_SEED.value, batch_size=_BATCH_SIZE.value, process_index=0,
                                    process_count=1)
    batches = [{k: dataset[i][k] for k in ("latents", "text", "text_mask")} for i in range(_NUM_BATCHES.value)]
    return config, batches


def random_batches(config: SanaConfig) -> list[dict]:
    """Random clean latents and text features; each caption keeps a random number of tokens."""
    rng = np.random.default_rng(_SEED.value)
    side, length, batch_size = _LATENT_SIZE.value, _TEXT_LENGTH.value, _BATCH_SIZE.value
    batches = []
    for _ in range(_NUM_BATCHES.value):
        lengths = rng.integers(1, length + 1, batch_size)
        batches.append({
            "latents": rng.standard_normal((batch_size, side, side, config.in_channels), np.float32),
            "text": rng.standard_normal((batch_size, length, config.caption_channels), np.float32),
            "text_mask": (np.arange(length)[None] < lengths[:, None]).astype(np.int32),
        })
    return batches


def plot(importance: np.ndarray, per_timestep: np.ndarray, timesteps: list[int], title: str, path: str):
    depth = importance.size
    fig = Figure(figsize=(max(6.0, 0.3 * depth + 2), 7), layout="constrained")
    bars, heat = fig.subplots(2, 1)
    bars.bar(np.arange(depth), importance, color="tab:blue")
    bars.set(xlabel="block", ylabel="BI = 1 - E[cos(h_in, h_out)]", title=title, xlim=(-0.5, depth - 0.5))
    image = heat.imshow(per_timestep, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set(xlabel="block", ylabel="timestep", yticks=np.arange(len(timesteps)), yticklabels=timesteps)
    fig.colorbar(image, ax=heat, label="BI")
    for axes in (bars, heat):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    timesteps = [int(t) for t in _TIMESTEPS.value.split(",")]

    if _CHECKPOINT.value:
        config, params = checkpoint.load(_CHECKPOINT.value)
        name = _CHECKPOINT.value
    else:
        config, params, name = preset(_PRESET.value), None, _PRESET.value
    if _DATA.value == "shapes":
        config, batches = shapes_batches(config)
    else:
        batches = random_batches(config)
    if params is None:
        params = jax.jit(init_params)(config, jax.random.key(_SEED.value))

    per_timestep = surgery.block_importance_per_timestep(params, config, batches, timesteps=timesteps,
                                                         noise_seed=_NOISE_SEED.value)
    importance = per_timestep.mean(axis=0)
    print(f"block importance of {name} ({config.depth} blocks), {_NUM_BATCHES.value} x {_BATCH_SIZE.value} "
          f"{_DATA.value} samples")
    print("block      BI  " + "".join(f"{'t=' + str(t):>9}" for t in timesteps))
    for block in range(config.depth):
        print(f"{block:5d} {importance[block]:9.5f}  " + "".join(f"{v:9.5f}" for v in per_timestep[:, block]))
    if _KEEP.value is not None:
        print(f"the {_KEEP.value} most important blocks: {surgery.most_important_blocks(importance, _KEEP.value)}")
    plot(importance, per_timestep, timesteps, f"block importance: {name}", _OUT.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    cli.use_compilation_cache()
    app.run(main)

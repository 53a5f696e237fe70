"""Block importance of a SANA model: prints a table and plots a bar chart and a timestep x block heatmap.

The model comes from an orbax checkpoint (`sana_jax.checkpoint.save`) or a preset with random weights;
the calibration batches from the built-in shapes domain (`sana_jax.data`) or random latents and text.

  python tools/block_importance.py --preset=small --out=block_importance.png
  python tools/block_importance.py --checkpoint=CKPT_DIR --num_batches=16 --keep=18
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sana_jax import checkpoint, surgery
from sana_jax.model import SanaConfig, init_params, preset


def shapes_batches(config: SanaConfig | None, args) -> tuple[SanaConfig | None, list[dict]]:
    """Batches of the shapes domain; a preset config is resized to the data's channels."""
    from sana_jax.data import pipeline

    text_dim = config.caption_channels if args.checkpoint else pipeline.DataConfig.text_dim
    # A trained model's latent space and text encoder come from its metadata.
    trained = checkpoint.load_metadata(args.checkpoint).get("data", {}) if args.checkpoint else {}
    data = pipeline.DataConfig.from_mapping({
        **trained, "source": "shapes", "resolution": args.resolution, "downsample": args.downsample,
        "text_dim": text_dim, "domain_seed": args.seed})
    shapes = pipeline.element_shapes(data)
    channels = shapes["latents"][-1]
    if args.checkpoint and channels != config.in_channels:
        sys.exit(f"the checkpoint's model takes {config.in_channels} latent channels; shapes data with "
                 f"--downsample={args.downsample} gives {channels}")
    if not args.checkpoint:
        config = dataclasses.replace(config, in_channels=channels, out_channels=channels,
                                     caption_channels=shapes["text"][-1])
    dataset = pipeline.make_dataset(data, seed=args.seed, batch_size=args.batch_size, process_index=0,
                                    process_count=1)
    batches = [{k: dataset[i][k] for k in ("latents", "text", "text_mask")} for i in range(args.num_batches)]
    return config, batches


def random_batches(config: SanaConfig, args) -> list[dict]:
    """Random clean latents and text features; each caption keeps a random number of tokens."""
    rng = np.random.default_rng(args.seed)
    side, length = args.latent_size, args.text_length
    batches = []
    for _ in range(args.num_batches):
        lengths = rng.integers(1, length + 1, args.batch_size)
        batches.append({
            "latents": rng.standard_normal((args.batch_size, side, side, config.in_channels), np.float32),
            "text": rng.standard_normal((args.batch_size, length, config.caption_channels), np.float32),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="orbax checkpoint directory written by sana_jax.checkpoint.save")
    model.add_argument("--preset", help="a sana_jax.model preset with random weights")
    parser.add_argument("--data", choices=("shapes", "random"), default="shapes")
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--timesteps", default=",".join(map(str, surgery.DEFAULT_TIMESTEPS)),
                        help="comma-separated model timesteps in [0, 1000]")
    parser.add_argument("--resolution", type=int, default=32, help="shapes: image size in pixels")
    parser.add_argument("--downsample", type=int, default=4, help="shapes: pixels per latent cell")
    parser.add_argument("--latent_size", type=int, default=8, help="random: latent grid side")
    parser.add_argument("--text_length", type=int, default=16, help="random: text tokens")
    parser.add_argument("--seed", type=int, default=0, help="weights (preset) and data seed")
    parser.add_argument("--noise_seed", type=int, default=0)
    parser.add_argument("--keep", type=int, help="also print the KEEP most important blocks")
    parser.add_argument("--out", default="block_importance.png", help="PNG path of the plots")
    args = parser.parse_args()
    timesteps = [int(t) for t in args.timesteps.split(",")]

    if args.checkpoint:
        from sana_jax import checkpoint

        config, params = checkpoint.load(args.checkpoint)
        name = args.checkpoint
    else:
        config, params, name = preset(args.preset), None, args.preset
    if args.data == "shapes":
        config, batches = shapes_batches(config, args)
    else:
        batches = random_batches(config, args)
    if params is None:
        params = jax.jit(init_params)(config, jax.random.key(args.seed))

    per_timestep = surgery.block_importance_per_timestep(params, config, batches, timesteps=timesteps,
                                                         noise_seed=args.noise_seed)
    importance = per_timestep.mean(axis=0)
    print(f"block importance of {name} ({config.depth} blocks), {args.num_batches} x {args.batch_size} "
          f"{args.data} samples")
    print("block      BI  " + "".join(f"{'t=' + str(t):>9}" for t in timesteps))
    for block in range(config.depth):
        print(f"{block:5d} {importance[block]:9.5f}  " + "".join(f"{v:9.5f}" for v in per_timestep[:, block]))
    if args.keep is not None:
        print(f"the {args.keep} most important blocks: {surgery.most_important_blocks(importance, args.keep)}")
    plot(importance, per_timestep, timesteps, f"block importance: {name}", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

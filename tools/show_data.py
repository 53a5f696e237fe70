"""Writes a PNG grid of training samples with their prompts.

Shapes domain (one column per task):
  python tools/show_data.py --out docs/shapes_samples.png --size 32
Cached records (decoded with the space-to-depth autoencoder they were prepared with):
  python tools/show_data.py --data_dir /tmp/prepared --out /tmp/records.png
"""

from __future__ import annotations

import argparse

import numpy as np

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import checker, records, shapes
from sana_jax.grids import save_grid


def shapes_cells(seed: int, rows: int, size: int) -> list[tuple[np.ndarray, str]]:
    """rows x len(TASKS) samples, row-major, each with its prompt and the checker's verdict."""
    cells = []
    for index in range(rows * len(shapes.TASKS)):
        sample = shapes.make_sample(seed, index, size=size)
        verdict = "ok" if checker.check(sample.prompt, sample.image) else "REJECTED"
        cells.append((sample.image, f"{sample.prompt} [{verdict}]"))
    return cells


def record_cells(data_dir: str, count: int) -> list[tuple[np.ndarray, str]]:
    """The first `count` records of a prepared dataset, decoded to images."""
    metadata = records.read_metadata(data_dir)
    if metadata["autoencoder"]["name"] != SpaceToDepthAE.__name__:
        raise SystemExit(f"{data_dir} holds {metadata['autoencoder']['name']} latents; only "
                         f"{SpaceToDepthAE.__name__} latents can be shown here")
    autoencoder = SpaceToDepthAE(**metadata["autoencoder"]["config"])
    source = records.RecordSource(records.shard_paths(data_dir))
    cells = []
    for index in range(min(count, len(source))):
        record = source[index]
        image = np.asarray(autoencoder.decode(record["latents"][None])[0])
        cells.append((np.rint(image * 255).astype(np.uint8), record["caption"]))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--data_dir", help="a prepared dataset to show instead of the shapes domain")
    parser.add_argument("--seed", type=int, default=0, help="shapes domain seed")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="shapes image side in pixels")
    parser.add_argument("--scale", type=int, default=4, help="upscaling factor of the shown images")
    args = parser.parse_args()
    columns = len(shapes.TASKS)
    if args.data_dir:
        cells = record_cells(args.data_dir, args.rows * columns)
    else:
        cells = shapes_cells(args.seed, args.rows, args.size)
    images, captions = zip(*cells, strict=True)
    save_grid(args.out, np.stack(images), captions, scale=args.scale, columns=columns)
    print(f"wrote {len(cells)} samples to {args.out}")


if __name__ == "__main__":
    main()

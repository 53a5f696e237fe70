"""Writes a PNG grid of training samples with their prompts.

Shapes domain (one column per task):
  python tools/show_data.py --out docs/shapes_samples.png --size 32
Cached records (decoded with the space-to-depth autoencoder they were prepared with):
  python tools/show_data.py --data_dir /tmp/prepared --out /tmp/records.png
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import flags

from sana_jax import cli
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
    try:
        metadata = records.read_metadata(data_dir)
    except OSError as error:
        cli.fail(f"--data_dir={data_dir}: expected a directory written by tools/prepare_data.py ({error})")
    if metadata["autoencoder"]["name"] != SpaceToDepthAE.__name__:
        cli.fail(f"{data_dir} holds {metadata['autoencoder']['name']} latents; only {SpaceToDepthAE.__name__} "
                 "latents can be shown here")
    autoencoder = SpaceToDepthAE(**metadata["autoencoder"]["config"])
    source = records.RecordSource(records.shard_paths(data_dir))
    cells = []
    for index in range(min(count, len(source))):
        record = source[index]
        image = np.asarray(autoencoder.decode(record["latents"][None])[0])
        cells.append((np.rint(image * 255).astype(np.uint8), record["caption"]))
    return cells


def flag_values() -> flags.FlagValues:
    """The command line's flags, on their own `FlagValues`."""
    values = flags.FlagValues()
    define = {"flag_values": values}
    flags.DEFINE_string("out", None, "PNG file to write", **define)
    flags.mark_flag_as_required("out", flag_values=values)
    flags.DEFINE_string("data_dir", None, "a prepared dataset to show instead of the shapes domain", **define)
    flags.DEFINE_integer("seed", 0, "shapes domain seed", **define)
    flags.DEFINE_integer("rows", 4, "rows of samples", **define)
    flags.DEFINE_integer("size", 32, "shapes image side in pixels", **define)
    flags.DEFINE_integer("scale", 4, "upscaling factor of the shown images", **define)
    return values


def main(argv: Sequence[str] | None = None) -> None:
    """Writes the grid the command line `argv` (None: `sys.argv[1:]`) asks for."""
    args = flag_values()
    cli.parse(args, argv, __doc__)
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

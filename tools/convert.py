"""Converts SANA transformer checkpoints between diffusers, native NVlabs and orbax formats.

  python tools/convert.py diffusers-to-orbax SRC DST  # SRC: config.json + one or sharded *.safetensors
  python tools/convert.py orbax-to-diffusers SRC DST  # DST: for SanaTransformer2DModel.from_pretrained
  python tools/convert.py sana-pth-to-orbax SRC.pth DST [--cross-heads N] [--head-dim 32]

The output is written beside DST and renamed into place at the end, so DST is untouched on any failure.
An existing DST is replaced only with --force and only when it holds nothing but what a conversion writes
(never SRC, a folder holding SRC, or other files). A native checkpoint's null caption
(`y_embedder.y_embedding`, the CFG negative of its training) is kept as DST/null_caption.npy.
Any missing, unexpected or mis-shaped key is an error naming the key and both shapes (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sana_jax import checkpoint, convert

NULL_CAPTION_FILE = "null_caption.npy"
# What the conversions write: a sana_jax.checkpoint (+ null caption) or a diffusers folder, whose weight
# files all start with convert.WEIGHTS_NAME.
OUTPUT_NAMES = (checkpoint.PARAMS_DIR, checkpoint.CONFIG_FILE, checkpoint.METADATA_FILE, NULL_CAPTION_FILE,
                "config.json")


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuses SRC itself or a folder holding it as DST, and an existing DST without --force."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST {dst} is the source: choose another DST")
    if dst.resolve() in src.resolve().parents:
        raise ValueError(f"DST {dst} is a parent of SRC {src}: choose another DST")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")


def check_replaceable(dst: Path) -> None:
    """Refuses to replace a DST that holds anything a conversion does not write."""
    if not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not an earlier conversion's output: choose another DST")
    foreign = sorted(p.name for p in dst.iterdir()
                     if p.name not in OUTPUT_NAMES and not p.name.startswith(convert.WEIGHTS_NAME))
    if foreign:
        raise FileExistsError(f"{dst} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} that "
                              "convert did not write; --force replaces only an earlier output: choose another DST")


def diffusers_to_orbax(args: argparse.Namespace) -> None:
    config, params = convert.read_diffusers(args.src, dtype=args.dtype, progress=True)
    with checkpoint.staged(args.dst, check_replaceable) as out:
        checkpoint.save(out, config, params)


def orbax_to_diffusers(args: argparse.Namespace) -> None:
    config, params = checkpoint.load(args.src)
    with checkpoint.staged(args.dst, check_replaceable) as out:
        convert.write_diffusers(out, config, params, dtype=args.dtype)


def sana_pth_to_orbax(args: argparse.Namespace) -> None:
    config, params, null_caption = convert.read_sana_pth(
        args.src, head_dim=args.head_dim, cross_num_heads=args.cross_heads, dtype=args.dtype, progress=True)
    with checkpoint.staged(args.dst, check_replaceable) as out:
        checkpoint.save(out, config, params)
        if null_caption is not None:
            np.save(out / NULL_CAPTION_FILE, null_caption)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, run, src_help in [
        ("diffusers-to-orbax", diffusers_to_orbax, "diffusers transformer folder"),
        ("orbax-to-diffusers", orbax_to_diffusers, "orbax checkpoint directory"),
        ("sana-pth-to-orbax", sana_pth_to_orbax, "native NVlabs .pth file"),
    ]:
        command = commands.add_parser(name, help=f"{src_help} -> {name.rsplit('-', 1)[1]}")
        command.set_defaults(run=run)
        command.add_argument("src", type=Path, help=src_help)
        command.add_argument("dst", type=Path, help="output path (written only on success)")
        command.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                             help="cast the weights (default: keep bfloat16 if all are, else float32)")
        command.add_argument("--force", action="store_true",
                             help="replace an existing DST that holds an earlier conversion's output")
        if name == "sana-pth-to-orbax":
            command.add_argument("--head-dim", type=int, default=convert.NATIVE_SELF_HEAD_DIM,
                                 help="self-attention head dim (default: %(default)s, every SANA model)")
            command.add_argument("--cross-heads", type=int, default=None,
                                 help="cross-attention heads (default: from the preset of the same width)")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_destination(args.src, args.dst, args.force)
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

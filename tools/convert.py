"""Converts SANA transformer checkpoints between diffusers, native NVlabs and orbax formats.

  python tools/convert.py diffusers-to-orbax SRC DST  # SRC: config.json + one or sharded *.safetensors
  python tools/convert.py orbax-to-diffusers SRC DST  # DST: for SanaTransformer2DModel.from_pretrained
  python tools/convert.py sana-pth-to-orbax SRC.pth DST [--cross-heads N] [--head-dim 32]

The output is written beside DST and renamed into place at the end, so DST is untouched on any failure
(an existing DST is replaced only with --force). A native checkpoint's null caption
(`y_embedder.y_embedding`, the CFG negative of its training) is kept as DST/null_caption.npy.
Any missing, unexpected or mis-shaped key is an error naming the key and both shapes (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sana_jax import checkpoint, convert

NULL_CAPTION_FILE = "null_caption.npy"


@contextlib.contextmanager
def staged(dst: Path, force: bool) -> Iterator[Path]:
    """Yields a fresh path beside `dst`; moves it to `dst` on success, removes it on failure."""
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield scratch / "out"
        if dst.exists():
            dst.rename(scratch / "replaced")
        (scratch / "out").rename(dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def diffusers_to_orbax(args: argparse.Namespace) -> None:
    config, params = convert.read_diffusers(args.src, dtype=args.dtype, progress=True)
    with staged(args.dst, args.force) as out:
        checkpoint.save(out, config, params)


def orbax_to_diffusers(args: argparse.Namespace) -> None:
    config, params = checkpoint.load(args.src)
    with staged(args.dst, args.force) as out:
        convert.write_diffusers(out, config, params, dtype=args.dtype)


def sana_pth_to_orbax(args: argparse.Namespace) -> None:
    config, params, null_caption = convert.read_sana_pth(
        args.src, head_dim=args.head_dim, cross_num_heads=args.cross_heads, dtype=args.dtype, progress=True)
    with staged(args.dst, args.force) as out:
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
        command.add_argument("--force", action="store_true", help="replace an existing DST")
        if name == "sana-pth-to-orbax":
            command.add_argument("--head-dim", type=int, default=convert.NATIVE_SELF_HEAD_DIM,
                                 help="self-attention head dim (default: %(default)s, every SANA model)")
            command.add_argument("--cross-heads", type=int, default=None,
                                 help="cross-attention heads (default: from the preset of the same width)")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

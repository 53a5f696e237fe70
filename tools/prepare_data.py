"""Prepares an image-caption collection as ArrayRecord shards of cached latents and text features.

  python tools/prepare_data.py SRC DST [--resolution 32] [--shard_size 1024]

SRC is a folder of images with same-named .txt captions, or a JSONL file of
{"image": path, "caption": text} lines. DST receives `data-SSSSS.array_record` shards,
`null_caption.npz` and `metadata.json` (see sana_jax/data/records.py); train from it with the data
config `source="array_record", data_dir=DST`. Rerunning the same command resumes by shard (and
rewrites the shards whose captions were edited since). Images that cannot be read and captions the
text encoder refuses (e.g. a word outside the shapes vocabulary) are skipped and listed at the end.

The built-in space-to-depth autoencoder and word-level text encoder are the defaults; --dc_ae and
--gemma swap in a DC-AE and Gemma-2, which share their interfaces.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from sana_jax import cli
from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import prepare
from sana_jax.text_encoder import WordTextEncoder


def flag_values() -> flags.FlagValues:
    """The command line's flags, on their own `FlagValues`; SRC and DST are positional."""
    values = flags.FlagValues()
    define = {"flag_values": values}
    flags.DEFINE_integer("resolution", 32, "images are centre-cropped and resized to this side", **define)
    flags.DEFINE_integer("shard_size", 1024, "records per shard", **define)
    flags.DEFINE_integer("batch_size", 64, "images encoded at once", **define)
    flags.DEFINE_integer("downsample", 4, "space-to-depth factor of the autoencoder", **define)
    flags.DEFINE_string("dc_ae", None, "a diffusers AutoencoderDC folder to use instead of space-to-depth", **define)
    flags.DEFINE_integer("text_length", 16, "text encoder tokens", **define)
    flags.DEFINE_integer("text_dim", 64, "word-level text encoder feature width", **define)
    flags.DEFINE_integer("text_seed", 0, "word-level text encoder embedding seed", **define)
    flags.DEFINE_string("gemma", None, "a Gemma-2 checkpoint (folder or hub id) to use instead of the word-level "
                        "text encoder; --text_length sets its positions (300 for SANA)", **define)
    return values


def main(argv: Sequence[str] | None = None) -> None:
    """Prepares SRC into DST as the command line `argv` (None: `sys.argv[1:]`) says."""
    args = flag_values()
    positional = cli.parse(args, argv, __doc__, positional=True)
    if len(positional) != 2:
        cli.fail(f"expected SRC (a folder of images with .txt captions, or a .jsonl file) and DST (the output "
                 f"directory), got {positional}")
    src, dst = positional
    try:
        items, skipped = prepare.read_collection(src)
    except (OSError, ValueError) as error:
        cli.fail(f"SRC: {error}")
    if args.dc_ae:
        from sana_jax.autoencoder.latent_space import DCAE  # loads JAX and the network only when asked
        autoencoder = DCAE.from_pretrained(args.dc_ae)
    else:
        autoencoder = SpaceToDepthAE(downsample=args.downsample)
    if args.gemma:
        from sana_jax.text_encoder import GemmaTextEncoder  # loads transformers only when asked
        text_encoder = GemmaTextEncoder(args.gemma, max_length=args.text_length)
    else:
        text_encoder = WordTextEncoder(max_length=args.text_length, feature_dim=args.text_dim,
                                       seed=args.text_seed)
    metadata = prepare.prepare(items, dst, autoencoder=autoencoder, text_encoder=text_encoder,
                               resolution=args.resolution, shard_size=args.shard_size,
                               batch_size=args.batch_size, skipped=skipped)
    print(f"{metadata['num_records']} records in {metadata['num_shards']} shard(s) under {dst}; "
          f"latents {metadata['latent_shape']}, text {metadata['text_shape']}")
    for path, reason in metadata["skipped"]:
        print(f"skipped {path}: {reason}")


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    cli.use_compilation_cache()
    main()

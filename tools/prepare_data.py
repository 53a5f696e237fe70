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

import argparse

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import prepare
from sana_jax.text_encoder import WordTextEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of images with .txt captions, or a .jsonl file")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--resolution", type=int, default=32,
                        help="images are centre-cropped and resized to this side")
    parser.add_argument("--shard_size", type=int, default=1024, help="records per shard")
    parser.add_argument("--batch_size", type=int, default=64, help="images encoded at once")
    parser.add_argument("--downsample", type=int, default=4, help="space-to-depth factor of the autoencoder")
    parser.add_argument("--dc_ae", help="a diffusers AutoencoderDC folder to use instead of space-to-depth")
    parser.add_argument("--text_length", type=int, default=16, help="text encoder tokens")
    parser.add_argument("--text_dim", type=int, default=64, help="word-level text encoder feature width")
    parser.add_argument("--text_seed", type=int, default=0, help="word-level text encoder embedding seed")
    parser.add_argument("--gemma", help="a Gemma-2 checkpoint (folder or hub id) to use instead of the "
                        "word-level text encoder; --text_length sets its positions (300 for SANA)")
    args = parser.parse_args()
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
    items, skipped = prepare.read_collection(args.src)
    metadata = prepare.prepare(items, args.dst, autoencoder=autoencoder, text_encoder=text_encoder,
                               resolution=args.resolution, shard_size=args.shard_size,
                               batch_size=args.batch_size, skipped=skipped)
    print(f"{metadata['num_records']} records in {metadata['num_shards']} shard(s) under {args.dst}; "
          f"latents {metadata['latent_shape']}, text {metadata['text_shape']}")
    for path, reason in metadata["skipped"]:
        print(f"skipped {path}: {reason}")


if __name__ == "__main__":
    main()

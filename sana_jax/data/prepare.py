"""Turning an image-caption collection into ArrayRecord shards of cached latents and text features.

A collection is either a folder of images, each with a caption file of the same stem (`cat.png` and
`cat.txt`), or a JSONL file with one `{"image": path, "caption": text}` object per line (relative
paths are relative to the JSONL file's folder). Items are sorted and cut into shards of `shard_size`;
a shard is done once its `data-SSSSS.json` summary exists, so an interrupted run resumes at the
first unfinished shard; a done shard whose captions have changed since is written again. Unreadable
images and captions the text encoder refuses are skipped and reported, never fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sana_jax.autoencoder import Autoencoder
from sana_jax.data import images, records
from sana_jax.text_encoder import TextEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image file and its caption."""

    image: str
    caption: str


def read_collection(path: str | os.PathLike) -> tuple[list[Item], list[tuple[str, str]]]:
    """Lists a folder of images with .txt captions, or a JSONL file of image paths and captions.

    Returns the items sorted by image path, and (path, reason) for images left out (no caption).
    """
    path = Path(path)
    items, skipped = [], []
    if path.is_dir():
        for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if caption.exists():
                items.append(Item(str(image), caption.read_text().strip()))
            else:
                skipped.append((str(image), f"no caption file {caption.name}"))
    elif path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image, caption = Path(entry["image"]), str(entry["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with 'image' and 'caption' "
                                 f"({type(e).__name__}: {e})") from e
            items.append(Item(str(image if image.is_absolute() else path.parent / image), caption))
        items.sort(key=lambda item: item.image)
    else:
        raise ValueError(f"{path}: expected a folder of images with .txt captions or a .jsonl file")
    return items, skipped


def describe(encoder: Any) -> dict[str, Any]:
    """Name and configuration of an encoder, for the dataset metadata.

    The configuration is a dataclass's fields, or else the public scalar attributes.
    """
    if dataclasses.is_dataclass(encoder):
        config = dataclasses.asdict(encoder)
    else:
        config = {k: v for k, v in vars(encoder).items()
                  if not k.startswith("_") and isinstance(v, bool | int | float | str)}
    return {"name": type(encoder).__name__, "config": config}


def _fingerprint(strings: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for string in strings:
        digest.update(f"{string}\0".encode())
    return digest.hexdigest()


def _item_fingerprint(items: Sequence[Item]) -> str:
    return _fingerprint([s for item in items for s in (item.image, item.caption)])


def _encode_captions(text_encoder: TextEncoder, captions: Sequence[str]
                     ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, str]]:
    """({i: (text (L, C), mask (L,))} for the captions that encode, {i: reason} for the others).

    Encodes the batch at once; only when that fails, caption by caption to find the ones to skip.
    """
    try:
        text, mask = text_encoder.encode_text(captions)
        return dict(enumerate(zip(text, mask, strict=True))), {}
    except ValueError:
        pass
    encoded, refused = {}, {}
    for i, caption in enumerate(captions):
        try:
            text, mask = text_encoder.encode_text([caption])
            encoded[i] = (text[0], mask[0])
        except ValueError as e:
            refused[i] = f"caption: {e}"
    return encoded, refused


def _write_one_shard(path: Path, items: Sequence[Item], autoencoder: Autoencoder, text_encoder: TextEncoder,
                     resolution: int, batch_size: int, progress: tqdm) -> dict[str, Any]:
    """Encodes and writes one shard; returns its summary {"records", "skipped", "fingerprint"}."""
    serialised, skipped = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        readable, pixels = [], []
        for item in batch:
            try:
                pixels.append(images.load_image(item.image, resolution))
                readable.append(item)
            except Exception as e:  # any decoder failure means the file is unusable
                skipped.append((item.image, f"{type(e).__name__}: {e}"))
        progress.update(len(batch))
        encoded, refused = _encode_captions(text_encoder, [item.caption for item in readable])
        skipped += [(readable[i].image, reason) for i, reason in refused.items()]
        if not encoded:
            continue
        latents = np.asarray(autoencoder.encode(np.stack([pixels[i] for i in encoded])), np.float32)
        serialised += [records.encode_record(latent, text, mask, readable[i].caption)
                       for latent, (i, (text, mask)) in zip(latents, encoded.items(), strict=True)]
    if serialised:
        records.write_shard(path, serialised)
    else:
        path.unlink(missing_ok=True)  # from an earlier run with other captions
    return {"records": len(serialised), "skipped": skipped, "fingerprint": _item_fingerprint(items)}


def prepare(items: Sequence[Item], out_dir: str | os.PathLike, *, autoencoder: Autoencoder,
            text_encoder: TextEncoder, resolution: int, shard_size: int = 1024, batch_size: int = 64,
            skipped: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Writes `items` as a prepared dataset in `out_dir` (format in `sana_jax.data.records`).

    Resumes a run with the same images and settings (rewriting done shards whose captions changed);
    refuses an `out_dir` prepared from other images or with other settings.
    `skipped` lists inputs already left out while reading the collection, for the report.
    Returns the metadata that is also written to `out_dir/metadata.json`.
    """
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size}: expected positive integers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(items) // shard_size)
    plan = json.loads(json.dumps({  # as it reads back from JSON
        "items": len(items), "fingerprint": _fingerprint([item.image for item in items]),
        "shard_size": shard_size, "resolution": resolution, "autoencoder": describe(autoencoder),
        "text_encoder": describe(text_encoder)}))
    plan_path = out_dir / PLAN
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        changed = sorted(k for k in plan.keys() | previous.keys() if previous.get(k) != plan.get(k))
        if changed:
            diffs = "; ".join(f"{k} was {reprlib.repr(previous.get(k))}, now {reprlib.repr(plan.get(k))}"
                              for k in changed)
            raise ValueError(f"{out_dir} was prepared with other inputs or settings ({diffs}); "
                             "use a new directory")
    else:
        plan_path.write_text(json.dumps(plan, indent=2))
    summaries = []
    with tqdm(total=len(items), desc="prepare", unit="img") as progress:
        for shard in range(num_shards):
            summary_path = out_dir / records.shard_name(shard).replace(records.SHARD_SUFFIX, ".json")
            shard_items = items[shard * shard_size:(shard + 1) * shard_size]
            if summary_path.exists():
                summary = json.loads(summary_path.read_text())
                if summary.get("fingerprint") == _item_fingerprint(shard_items):
                    summaries.append(summary)
                    progress.update(len(shard_items))
                    continue
            summary = _write_one_shard(out_dir / records.shard_name(shard), shard_items, autoencoder,
                                       text_encoder, resolution, batch_size, progress)
            summary_path.write_text(json.dumps(summary, indent=2))
            summaries.append(summary)
    text, mask = text_encoder.encode_text([""])
    records.write_null_caption(out_dir, text[0], mask[0])
    side = resolution // autoencoder.downsample
    metadata = {
        "num_records": sum(s["records"] for s in summaries),
        "num_shards": sum(1 for s in summaries if s["records"]),
        "latent_shape": [side, side, autoencoder.latent_channels],
        "text_shape": [text_encoder.max_length, text_encoder.feature_dim],
        "resolution": resolution,
        "autoencoder": describe(autoencoder),
        "text_encoder": describe(text_encoder),
        "skipped": [list(s) for s in skipped] + [s for summary in summaries for s in summary["skipped"]],
    }
    records.write_metadata(out_dir, metadata)
    return metadata

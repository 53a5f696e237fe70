"""grain input pipelines: dict batches of latents and text features for the trainer.

Every pipeline yields numpy batches
  {"latents": (b, h, w, C) float32, "text": (b, L, C_text) float32, "text_mask": (b, L) int32,
   "prompt_id": (b,) int64}
with b = batch_size / process_count rows per process. `prompt_id` is the element's index in its
source: for "shapes" it is the sample index (`shapes.make_sample(domain_seed, prompt_id)` rebuilds the
image and prompt), for "array_record" the record index.

Sources:
  "shapes"        the built-in domain, rendered and encoded on the fly;
  "array_record"  shards of cached records written by `tools/prepare_data.py`;
  "tfds"          a TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).

Order: each process takes a contiguous, equal slice of the source (the remainder is dropped), reads it
in an order fixed by (seed, epoch) and reshuffled every epoch, and batches consecutive elements.
The iterator from `make_train_iterator` is a `grain.DatasetIterator`: `get_state()` / `set_state()`
(a small JSON-able dict) resume at the exact next batch. With orbax, save it as one item of a
composite checkpoint, `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))`, and
restore with `data=grain.checkpoint.CheckpointRestore(iterator)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sana_jax.autoencoder import Autoencoder, PatchPCAAE, SpaceToDepthAE
from sana_jax.data import images, records, shapes
from sana_jax.text_encoder import TextEncoder, WordTextEncoder

SOURCES = ("shapes", "array_record", "tfds")
LATENTS = ("space_to_depth", "patch_pca")
BATCH_KEYS = ("latents", "text", "text_mask", "prompt_id")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to encode it (see the module docstring for the sources)."""

    source: str = "shapes"
    # shapes: element i is shapes.make_sample(domain_seed, i, size=resolution, tasks=tasks), for i in
    # [0, epoch_size). `resolution` also sets the image side for tfds.
    resolution: int = 32
    domain_seed: int = 0
    tasks: tuple[str, ...] = shapes.TASKS
    epoch_size: int = 100_000
    # array_record: a directory written by tools/prepare_data.py.
    data_dir: str = ""
    # tfds: a dataset already prepared in ArrayRecord format under tfds_data_dir.
    tfds_name: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    image_key: str = "image"
    caption_key: str = "caption"  # "/" separates nested keys; a list of captions gives its first one
    # Built-in encoders for the raw sources (shapes, tfds): the latent space (`LATENTS`; "patch_pca" keeps
    # `latent_channels` principal components of each patch and is fitted to the shapes domain).
    latent: str = "space_to_depth"
    latent_channels: int = 16
    downsample: int = 4
    text_length: int = 16
    text_dim: int = 64
    text_seed: int = 0
    # A Gemma-2 checkpoint (local folder or hub id) whose features caption the images instead of the built-in
    # word encoder, which knows only the shapes vocabulary (`text_length` positions; text_dim and text_seed unused).
    gemma: str = ""
    # Probability of replacing a caption by the null caption (for classifier-free guidance).
    caption_dropout: float = 0.0
    num_epochs: int | None = None  # None repeats forever
    num_threads: int = 2  # grain read threads
    prefetch: int = 4  # batches read ahead

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source={self.source!r}: expected one of {SOURCES}")
        if self.latent not in LATENTS:
            raise ValueError(f"DataConfig.latent={self.latent!r}: expected one of {LATENTS}")
        unknown = [t for t in self.tasks if t not in shapes.TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"DataConfig.tasks={self.tasks!r}: expected a non-empty subset of "
                             f"{shapes.TASKS}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"DataConfig.caption_dropout={self.caption_dropout!r}: expected a value "
                             "in [0, 1)")
        if self.source == "array_record" and not self.data_dir:
            raise ValueError("DataConfig.data_dir is required for source 'array_record'")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("DataConfig.tfds_name is required for source 'tfds'")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | DataConfig) -> DataConfig:
        """Builds a config from a dict or an ml_collections.ConfigDict; unknown keys are an error."""
        if isinstance(values, DataConfig):
            return values
        values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
        if "tasks" in values:
            values["tasks"] = tuple(values["tasks"])
        return cls(**values)


def make_autoencoder(config: DataConfig) -> Autoencoder:
    """The built-in autoencoder of a config."""
    if config.latent == "patch_pca":
        return PatchPCAAE(downsample=config.downsample, channels=config.latent_channels,
                          resolution=config.resolution)
    return SpaceToDepthAE(downsample=config.downsample)


def make_text_encoder(config: Mapping[str, Any] | DataConfig) -> TextEncoder:
    """The text encoder of a config: Gemma-2 when `config.gemma` names one, else the built-in word encoder.

    Cached per config, so that a Gemma-2 is loaded once however many parts of a run ask for it.
    """
    return _text_encoder(DataConfig.from_mapping(config))


@functools.lru_cache(maxsize=4)
def _text_encoder(config: DataConfig) -> TextEncoder:
    if config.gemma:
        from sana_jax.text_encoder import GemmaTextEncoder  # loads transformers only when asked

        return GemmaTextEncoder(config.gemma, backend="auto", max_length=config.text_length)
    return WordTextEncoder(max_length=config.text_length, feature_dim=config.text_dim, seed=config.text_seed)


def null_caption(config: DataConfig,
                 text_encoder: TextEncoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (text (L, C_text), text_mask (L,)): stored with cached data, else encoded."""
    if config.source == "array_record":
        return records.read_null_caption(config.data_dir)
    text, mask = (text_encoder or make_text_encoder(config)).encode_text([""])
    return text[0], mask[0]


def element_shapes(config: DataConfig, autoencoder: Autoencoder | None = None,
                   text_encoder: TextEncoder | None = None) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes {"latents": (h, w, C), "text": (L, C_text)}, to size the model."""
    if config.source == "array_record":
        metadata = records.read_metadata(config.data_dir)
        return {"latents": tuple(metadata["latent_shape"]), "text": tuple(metadata["text_shape"])}
    autoencoder = autoencoder or make_autoencoder(config)
    text_encoder = text_encoder or make_text_encoder(config)
    side = config.resolution // autoencoder.downsample
    return {"latents": (side, side, autoencoder.latent_channels),
            "text": (text_encoder.max_length, text_encoder.feature_dim)}


class RenderShapes:
    """Batches sample indices of the shapes domain by drawing them together: b indices -> a raw batch
    {"image": (b, size, size, 3) uint8, "prompt": b strings, "prompt_id": (b,) int64}."""

    def __init__(self, seed: int, *, size: int = 32, tasks: Sequence[str] = shapes.TASKS):
        self.seed, self.size, self.tasks = seed, size, tuple(tasks)

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        samples = shapes.make_samples(self.seed, indices, size=self.size, tasks=self.tasks)
        return {"image": np.stack([s.image for s in samples]), "prompt": [s.prompt for s in samples],
                "prompt_id": np.asarray(indices, np.int64)}


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    """`example[a][b]` for the key "a/b"; a KeyError names the missing part and what was there."""
    value = example
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            found = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise KeyError(f"no {part!r} (of key {key!r}) in the example; found {found}")
        value = value[part]
    return value


def _as_text(value: Any) -> str:
    """A caption as str: bytes are UTF-8; of several captions (a list or array), the first."""
    if (isinstance(value, np.ndarray) and value.ndim > 0) or isinstance(value, list | tuple):
        value = value[0]
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """Image-caption examples of a random-access source (e.g. `tfds.data_source`) as raw elements.

    Element i is {"image": (resolution, resolution, 3) uint8, "prompt": str, "prompt_id": i}, from
    the example's `image_key` (any size, RGB or grey) and `caption_key`.
    """

    def __init__(self, data_source, *, resolution: int, image_key: str = "image",
                 caption_key: str = "caption"):
        self.data_source, self.resolution = data_source, resolution
        self.image_key, self.caption_key = image_key, caption_key

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.data_source[int(index)]
        image = images.fit_image(np.asarray(_lookup(example, self.image_key)), self.resolution)
        return {"image": image, "prompt": _as_text(_lookup(example, self.caption_key)),
                "prompt_id": np.int64(index)}


def tfds_data_source(name: str, *, split: str, data_dir: str | None):
    """`tfds.data_source` of an already prepared dataset (never downloads)."""
    try:
        import tensorflow_datasets as tfds  # optional: only this source needs it
    except ImportError as e:
        raise ImportError("source 'tfds' needs tensorflow-datasets: pip install 'sana-jax[tfds]'") from e
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.DatasetNotFoundError:
        prepared = False
    if not prepared:
        raise FileNotFoundError(f"no prepared TFDS dataset {name!r} in {data_dir or 'the default TFDS data_dir'}; "
                                "prepare it in ArrayRecord format first (docs/data.md)")
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def _source(config: DataConfig):
    if config.source == "shapes":  # sample indices, drawn a batch at a time (`RenderShapes`)
        return range(config.epoch_size)
    if config.source == "array_record":
        return records.RecordSource(records.shard_paths(config.data_dir))
    data_source = tfds_data_source(config.tfds_name, split=config.tfds_split, data_dir=config.tfds_data_dir)
    return TfdsSource(data_source, resolution=config.resolution, image_key=config.image_key,
                      caption_key=config.caption_key)


def _drop_captions_text(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cached batch -> the batch keys (the caption strings stay in the records)."""
    return {key: batch[key] for key in BATCH_KEYS}


class EncodeBatch(grain.transforms.Map):
    """Raw batch {"image", "prompt", "prompt_id"} -> {"latents", "text", "text_mask", "prompt_id"}."""

    def __init__(self, autoencoder: Autoencoder, text_encoder: TextEncoder):
        self.autoencoder, self.text_encoder = autoencoder, text_encoder

    def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        text, mask = self.text_encoder.encode_text([str(p) for p in batch["prompt"]])
        latents = np.asarray(self.autoencoder.encode(batch["image"]), np.float32)
        return {"latents": latents, "text": np.asarray(text, np.float32),
                "text_mask": np.asarray(mask, np.int32), "prompt_id": batch["prompt_id"]}


class DropCaptions(grain.transforms.RandomMap):
    """Replaces each row's caption by the null caption with probability `rate`."""

    def __init__(self, rate: float, text: np.ndarray, text_mask: np.ndarray):
        self.rate, self.text, self.text_mask = rate, text, text_mask

    def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        drop = rng.random(len(batch["prompt_id"])) < self.rate
        return {**batch, "text": np.where(drop[:, None, None], self.text, batch["text"]),
                "text_mask": np.where(drop[:, None], self.text_mask, batch["text_mask"])}


def make_dataset(config: Mapping[str, Any] | DataConfig, *, seed: int, batch_size: int, process_index: int,
                 process_count: int, autoencoder: Autoencoder | None = None,
                 text_encoder: TextEncoder | None = None) -> grain.MapDataset:
    """The batched dataset of this process: a `grain.MapDataset` of dict batches (see module docstring).

    Args:
      config: a `DataConfig` or a mapping of its fields.
      seed: shuffling (and caption dropout) seed, in [0, 2**32).
      batch_size: the global batch size, divisible by `process_count`.
      process_index, process_count: this process and the number of processes (`jax.process_index()`,
        `jax.process_count()` in a multi-host run).
      autoencoder, text_encoder: encoders for the raw sources; default to the config's built-in ones.
    """
    config = DataConfig.from_mapping(config)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    source = _source(config)
    per_process = len(source) // process_count
    if per_process == 0:
        raise ValueError(f"{source!r} has {len(source)} elements, fewer than {process_count} processes")
    ds = grain.MapDataset.source(source)[process_index * per_process:(process_index + 1) * per_process]
    ds = ds.seed(seed).shuffle().repeat(config.num_epochs)
    render = (RenderShapes(config.domain_seed, size=config.resolution, tasks=config.tasks)
              if config.source == "shapes" else None)
    ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=render)
    if config.source == "array_record":
        ds = ds.map(_drop_captions_text)
    else:
        text_encoder = text_encoder or make_text_encoder(config)
        ds = ds.map(EncodeBatch(autoencoder or make_autoencoder(config), text_encoder))
    if config.caption_dropout > 0:
        ds = ds.random_map(DropCaptions(config.caption_dropout, *null_caption(config, text_encoder)))
    return ds


def make_train_iterator(config: Mapping[str, Any] | DataConfig, *, seed: int, batch_size: int,
                        process_index: int, process_count: int, autoencoder: Autoencoder | None = None,
                        text_encoder: TextEncoder | None = None) -> grain.DatasetIterator:
    """An iterator over this process's batches, read ahead by threads; checkpointable (module docstring).

    Arguments as for `make_dataset`.
    """
    config = DataConfig.from_mapping(config)
    ds = make_dataset(config, seed=seed, batch_size=batch_size, process_index=process_index,
                      process_count=process_count, autoencoder=autoencoder, text_encoder=text_encoder)
    options = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
    return iter(ds.to_iter_dataset(options))

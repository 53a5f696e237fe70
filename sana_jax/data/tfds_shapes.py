"""The shapes domain as a TensorFlow Datasets builder, "sana_shapes" (needs tensorflow-datasets, not TensorFlow).

Importing this module registers the builder. Examples are {"image": (resolution, resolution, 3) uint8,
"caption": text}, stored in generation order: example i of "train" is
`shapes.make_sample(domain_seed, i, size=resolution)`, of "validation" `make_sample(domain_seed + 1, i, ...)`
(the held-out domain seed the trainer uses). Nothing is downloaded.

    builder = SanaShapes(config="32px", data_dir=DIR, file_format="array_record")
    builder.download_and_prepare()
    source = tfds.data_source("sana_shapes/32px", split="train", data_dir=DIR)

Reading a prepared dataset needs only its files, not this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from PIL import Image

try:
    import importlib_resources  # noqa: F401  (TFDS needs it to prepare a builder defined in a package)
    import tensorflow_datasets as tfds
except ImportError as e:
    raise ImportError(f"sana_jax.data.tfds_shapes needs the tfds extra: pip install 'sana-jax[tfds]' ({e})") from e

from sana_jax.data import shapes


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side in pixels, number of examples per split and the domain seed of the training split."""

    resolution: int = 32
    train_size: int = 10_000
    validation_size: int = 1_000
    domain_seed: int = 0

    def __post_init__(self):
        if self.resolution < shapes.MIN_SIZE:
            raise ValueError(f"ShapesConfig.resolution={self.resolution}: expected at least {shapes.MIN_SIZE}")
        if self.train_size <= 0 or self.validation_size <= 0:
            raise ValueError(f"ShapesConfig sizes train={self.train_size}, validation={self.validation_size}: "
                             "expected positive numbers of examples")


class SanaShapes(tfds.core.GeneratorBasedBuilder):
    """The shapes domain (`sana_jax.data.shapes`): rendered images with their prompts as captions."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShapesConfig(name="32px", resolution=32), ShapesConfig(name="64px", resolution=64)]

    def _info(self) -> tfds.core.DatasetInfo:
        side = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural shapes with GenEval-style prompts (sana_jax.data.shapes).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(side, side, 3)),
                "caption": tfds.features.Text(),
            }),
            disable_shuffling=True,  # example i is sample i
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        config = self.builder_config
        return {"train": self._generate_examples(config.domain_seed, config.train_size),
                "validation": self._generate_examples(config.domain_seed + 1, config.validation_size)}

    def _generate_examples(self, seed: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in range(count):
            sample = shapes.make_sample(seed, index, size=self.builder_config.resolution)
            # A PIL image is PNG-encoded by Pillow; a NumPy array would need TensorFlow's encoder.
            yield index, {"image": Image.fromarray(sample.image), "caption": sample.prompt}

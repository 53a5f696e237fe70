"""The shapes TFDS builder prepared with the real tensorflow-datasets, read back and trained on (no TensorFlow)."""

import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_text_encoder import save_tiny_gemma
from test_train import read_metrics, tiny_config

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import shapes
from sana_jax.data.pipeline import DataConfig, make_dataset
from sana_jax.data.tfds_shapes import SanaShapes, ShapesConfig
from sana_jax.model import init_params
from sana_jax.text_encoder import GemmaTextEncoder
from sana_jax.trainer import train
from sana_jax.trainer.loop import model_config_for

SEED = 3
TINY = ShapesConfig(name="tiny", resolution=32, train_size=16, validation_size=4, domain_seed=SEED)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    SanaShapes(config=TINY, data_dir=path, file_format="array_record").download_and_prepare()
    return str(path)


def test_data_source_holds_the_shapes_samples_in_order(data_dir):
    for split, seed, size in (("train", SEED, 16), ("validation", SEED + 1, 4)):
        source = tfds.data_source("sana_shapes/tiny", split=split, data_dir=data_dir, download=False)
        assert len(source) == size
        for index in range(size):
            example, sample = source[index], shapes.make_sample(seed, index, size=32)
            assert example["image"].dtype == np.uint8
            np.testing.assert_array_equal(example["image"], sample.image)
            assert example["caption"].decode() == sample.prompt
    assert "tensorflow" not in sys.modules


def test_tfds_source_batches_are_the_encoded_samples(data_dir):
    config = {"source": "tfds", "tfds_name": "sana_shapes/tiny", "tfds_data_dir": data_dir}
    batch = make_dataset(config, seed=0, batch_size=4, process_index=0, process_count=1)[0]
    images = np.stack([shapes.make_sample(SEED, int(i)).image for i in batch["prompt_id"]])
    np.testing.assert_array_equal(batch["latents"], SpaceToDepthAE().encode(images))


def test_trains_from_the_tfds_source(data_dir, tmp_path):
    config = tiny_config(steps=3, **{"data.source": "tfds", "data.tfds_name": "sana_shapes/tiny",
                                     "data.tfds_data_dir": data_dir})
    initial = init_params(model_config_for(config, DataConfig.from_mapping(config.data)), jax.random.key(0))
    _, params = train(config, tmp_path, params=initial)
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    change = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial), strict=True))
    assert change > 0


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("gemma2"))


def test_trains_on_gemma_features_from_the_tfds_source(data_dir, gemma_checkpoint, tmp_path):
    """`data.gemma` captions any dataset with Gemma-2 features instead of the shapes-only word encoder."""
    data = {"source": "tfds", "tfds_name": "sana_shapes/tiny", "tfds_data_dir": data_dir, "gemma": gemma_checkpoint,
            "text_length": 12}
    batch = make_dataset(data, seed=0, batch_size=4, process_index=0, process_count=1)[0]
    captions = [shapes.make_sample(SEED, int(i)).prompt for i in batch["prompt_id"]]
    text, mask = GemmaTextEncoder(gemma_checkpoint, backend="torch", max_length=12).encode_text(captions)
    np.testing.assert_allclose(batch["text"], text, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["text_mask"], mask)

    config = tiny_config(steps=2, **{f"data.{key}": value for key, value in data.items()})
    _, params = train(config, tmp_path)
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert params["caption_projection"]["linear_1"]["kernel"].shape[0] == text.shape[-1]  # Gemma's width


def test_unprepared_dataset_is_named(tmp_path):
    config = {"source": "tfds", "tfds_name": "sana_shapes/32px", "tfds_data_dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset 'sana_shapes/32px' in .*ArrayRecord"):
        make_dataset(config, seed=0, batch_size=4, process_index=0, process_count=1)


def test_bad_builder_config_is_named():
    with pytest.raises(ValueError, match="ShapesConfig.resolution=16"):
        ShapesConfig(name="small", resolution=16)

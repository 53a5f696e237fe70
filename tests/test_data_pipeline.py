"""grain pipelines over the shapes domain and the TFDS adapter: content, order, sharding, resumption."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import pipeline, shapes
from sana_jax.data.pipeline import DataConfig, make_dataset, make_train_iterator
from sana_jax.text_encoder import WordTextEncoder

SMALL = {"epoch_size": 24, "domain_seed": 5}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_hold_the_encoded_samples_named_by_prompt_id():
    batch = next(make_train_iterator(SMALL, seed=1, batch_size=4, process_index=0, process_count=1))
    assert batch["latents"].shape == (4, 8, 8, 48) and batch["latents"].dtype == np.float32
    assert batch["text"].shape == (4, 16, 64) and batch["text_mask"].dtype == np.int32
    assert batch["prompt_id"].dtype == np.int64
    samples = [shapes.make_sample(5, int(i)) for i in batch["prompt_id"]]
    latents = SpaceToDepthAE().encode(np.stack([s.image for s in samples]))
    np.testing.assert_array_equal(batch["latents"], latents)
    text, mask = WordTextEncoder().encode_text([s.prompt for s in samples])
    np.testing.assert_array_equal(batch["text"], text)
    np.testing.assert_array_equal(batch["text_mask"], mask)


def test_same_seed_same_batches_and_each_epoch_is_a_fresh_permutation():
    def run(seed):
        iterator = make_train_iterator(SMALL, seed=seed, batch_size=4, process_index=0, process_count=1)
        return _take(iterator, 12)

    first, again, other = run(7), run(7), run(8)
    _assert_batches_equal(first, again)
    ids = np.concatenate([b["prompt_id"] for b in first])
    assert sorted(ids[:24]) == list(range(24)) and sorted(ids[24:]) == list(range(24))
    assert not np.array_equal(ids[:24], ids[24:])
    assert not np.array_equal(ids, np.concatenate([b["prompt_id"] for b in other]))


def test_two_processes_read_disjoint_halves_that_cover_the_data():
    per_process = []
    for index in range(2):
        iterator = make_train_iterator(SMALL, seed=3, batch_size=8, process_index=index, process_count=2)
        batches = _take(iterator, 3)
        assert all(len(b["prompt_id"]) == 4 for b in batches)
        per_process.append({int(i) for b in batches for i in b["prompt_id"]})
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(range(24))


def test_restored_iterator_continues_with_the_exact_next_batch():
    config = dict(SMALL, caption_dropout=0.3)
    iterator = make_train_iterator(config, seed=2, batch_size=4, process_index=0, process_count=1)
    _take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))  # JSON-able, as orbax stores it
    expected = _take(iterator, 5)  # crosses into the second epoch
    fresh = make_train_iterator(config, seed=2, batch_size=4, process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 5), expected)


def test_iterator_checkpoints_with_orbax_through_grain(tmp_path):
    iterator = make_train_iterator(SMALL, seed=4, batch_size=4, process_index=0, process_count=1)
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 2)
    fresh = make_train_iterator(SMALL, seed=4, batch_size=4, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 2), expected)


def test_caption_dropout_swaps_in_the_null_caption():
    config = dict(SMALL, caption_dropout=0.5)
    batch = make_dataset(config, seed=0, batch_size=24, process_index=0, process_count=1)[0]
    prompts = [shapes.make_sample(5, int(i)).prompt for i in batch["prompt_id"]]
    text, mask = WordTextEncoder().encode_text(prompts)
    dropped = batch["text_mask"].sum(axis=1) == 0
    assert 3 <= dropped.sum() <= 21  # Binomial(24, 0.5)
    assert not batch["text"][dropped].any()
    np.testing.assert_array_equal(batch["text"][~dropped], text[~dropped])
    np.testing.assert_array_equal(batch["text_mask"][~dropped], mask[~dropped])
    null_text, null_mask = pipeline.null_caption(DataConfig())
    assert null_text.shape == (16, 64) and not null_text.any() and not null_mask.any()


class FakeTfdsSource:
    """Stands in for `tfds.data_source(...)`: random access to decoded example dicts."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.examples = [
            {"image": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
             "captions": {"text": np.array([b"a red circle", b"a second caption"], dtype=object)}},
            {"image": rng.integers(0, 256, (64, 48, 1), dtype=np.uint8),
             "captions": {"text": np.array([b"two squares"], dtype=object)}},
            {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "captions": {"text": np.array(["a blue diamond"], dtype=object)}},
            {"image": rng.integers(0, 256, (33, 90, 3), dtype=np.uint8),
             "captions": {"text": np.array([b"four triangles"], dtype=object)}},
        ]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def _centre_square(image, side):
    """Centre crop and resize with Pillow directly (the adapter's reference)."""
    from PIL import Image
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(image[top:top + s, left:left + s].squeeze(-1) if image.shape[-1] == 1
                           else image[top:top + s, left:left + s]).convert("RGB")
    return np.asarray(crop.resize((side, side), Image.Resampling.LANCZOS) if s != side else crop)


def test_tfds_adapter_maps_examples_to_encoded_batches(monkeypatch):
    fake = FakeTfdsSource()
    monkeypatch.setattr(pipeline, "tfds_data_source", lambda name, split, data_dir: fake)
    config = {"source": "tfds", "tfds_name": "fake", "caption_key": "captions/text"}
    batch = make_dataset(config, seed=0, batch_size=4, process_index=0, process_count=1)[0]
    order = [int(i) for i in batch["prompt_id"]]
    assert sorted(order) == [0, 1, 2, 3]
    expected_images = np.stack([_centre_square(fake.examples[i]["image"], 32) for i in order])
    np.testing.assert_array_equal(batch["latents"], SpaceToDepthAE().encode(expected_images))
    captions = ["a red circle", "two squares", "a blue diamond", "four triangles"]
    text, mask = WordTextEncoder().encode_text([captions[i] for i in order])
    np.testing.assert_array_equal(batch["text"], text)
    np.testing.assert_array_equal(batch["text_mask"], mask)


def test_tfds_adapter_names_a_missing_key():
    source = pipeline.TfdsSource(FakeTfdsSource(), resolution=32, caption_key="captions/label")
    with pytest.raises(KeyError, match="no 'label' .* found \\['text'\\]"):
        source[0]


def test_bad_configs_and_arguments_are_named():
    with pytest.raises(ValueError, match=r"unknown data config keys \['bach_size'\]"):
        DataConfig.from_mapping({"bach_size": 3})
    with pytest.raises(ValueError, match="DataConfig.source='webdataset'"):
        DataConfig(source="webdataset")
    with pytest.raises(ValueError, match="DataConfig.tasks"):
        DataConfig(tasks=("counting", "spelling"))
    with pytest.raises(ValueError, match="data_dir is required"):
        DataConfig(source="array_record")
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of process_count=4"):
        make_dataset(SMALL, seed=0, batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        make_dataset(SMALL, seed=0, batch_size=4, process_index=2, process_count=2)


def test_config_from_config_dict_and_element_shapes():
    import ml_collections
    config = DataConfig.from_mapping(ml_collections.ConfigDict(
        {"resolution": 64, "tasks": ["counting", "position"], "text_dim": 32}))
    assert config.tasks == ("counting", "position")
    assert pipeline.element_shapes(config) == {"latents": (16, 16, 48), "text": (16, 32)}
    batch = make_dataset(dict(SMALL, resolution=64, tasks=["counting"]), seed=0, batch_size=2,
                         process_index=0, process_count=1)[0]
    assert batch["latents"].shape == (2, 16, 16, 48)
    assert all(shapes.make_sample(5, int(i), size=64, tasks=("counting",)).spec.task == "counting"
               for i in batch["prompt_id"])

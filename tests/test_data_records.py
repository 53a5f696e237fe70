"""ArrayRecord shards of cached samples, and preparing them from image-caption collections."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import prepare, records, shapes
from sana_jax.data.pipeline import make_dataset, make_train_iterator
from sana_jax.text_encoder import WordTextEncoder

ROOT = Path(__file__).resolve().parents[1]


def _record(i):
    rng = np.random.default_rng(i)
    latents = rng.standard_normal((2, 2, 48)).astype(np.float32)
    text = rng.standard_normal((16, 8)).astype(np.float32)
    return latents, text, (np.arange(16) < i + 1).astype(np.int32), f"caption {i}"


def test_records_round_trip_across_shards(tmp_path):
    paths = [tmp_path / "data-00000.array_record", tmp_path / "data-00001.array_record"]
    assert records.write_shard(paths[0], [records.encode_record(*_record(i)) for i in range(3)]) == 3
    assert records.write_shard(paths[1], [records.encode_record(*_record(i)) for i in range(3, 5)]) == 2
    assert not list(tmp_path.glob("*.partial"))
    source = records.RecordSource(records.shard_paths(tmp_path))
    assert len(source) == 5
    for i in range(5):
        latents, text, mask, caption = _record(i)
        element = source[i]
        np.testing.assert_array_equal(element["latents"], latents)
        np.testing.assert_array_equal(element["text"], text)
        np.testing.assert_array_equal(element["text_mask"], mask)
        assert element["caption"] == caption and element["prompt_id"] == i
    with pytest.raises(IndexError, match="record 5 out of range for 5"):
        source[5]


def test_caption_dropout_on_cached_data_uses_the_stored_null_caption(tmp_path):
    cached = [records.encode_record(*_record(i)) for i in range(8)]
    records.write_shard(tmp_path / "data-00000.array_record", cached)
    null_text = np.full((16, 8), 0.5, np.float32)  # a real text encoder's "" is not zeros
    null_mask = np.eye(16, dtype=np.int32)[0]
    records.write_null_caption(tmp_path, null_text, null_mask)
    config = {"source": "array_record", "data_dir": str(tmp_path), "caption_dropout": 0.5}
    batch = make_dataset(config, seed=1, batch_size=8, process_index=0, process_count=1)[0]
    dropped = np.array([np.array_equal(t, null_text) for t in batch["text"]])
    assert 1 <= dropped.sum() <= 7
    for row, index in enumerate(batch["prompt_id"]):
        _, text, mask, _ = _record(int(index))
        expected = (null_text, null_mask) if dropped[row] else (text, mask)
        np.testing.assert_array_equal(batch["text"][row], expected[0])
        np.testing.assert_array_equal(batch["text_mask"][row], expected[1])


def test_corrupt_records_and_shards_are_named(tmp_path):
    good = [records.encode_record(*_record(i)) for i in range(4)]
    records.write_shard(tmp_path / "data-00000.array_record", good[:2])
    records.write_shard(tmp_path / "data-00001.array_record", [good[2], b"\x93not a record", good[3]])
    source = records.RecordSource(records.shard_paths(tmp_path))
    np.testing.assert_array_equal(source[4]["latents"], _record(3)[0])
    with pytest.raises(ValueError, match=r"corrupt record 1 in shard .*data-00001\.array_record"):
        source[3]
    truncated = tmp_path / "data-00002.array_record"
    truncated.write_bytes((tmp_path / "data-00000.array_record").read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"cannot open shard .*data-00002\.array_record"):
        records.RecordSource(records.shard_paths(tmp_path))
    with pytest.raises(FileNotFoundError, match="no \\*.array_record shards"):
        records.shard_paths(tmp_path / "missing")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Ten rendered PNGs with .txt captions, one corrupt PNG, one image without a caption."""
    folder = tmp_path_factory.mktemp("collection")
    samples = [shapes.make_sample(9, i) for i in range(10)]
    for i, sample in enumerate(samples):
        Image.fromarray(sample.image).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(sample.prompt + "\n")
    (folder / "img04b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "img04b.txt").write_text("a circle")
    Image.fromarray(samples[0].image).save(folder / "uncaptioned.png")
    return folder, samples


def _read_back(data_dir, n):
    iterator = make_train_iterator({"source": "array_record", "data_dir": str(data_dir)}, seed=0,
                                   batch_size=n, process_index=0, process_count=1)
    batch = next(iterator)
    order = np.argsort(batch["prompt_id"])
    return {key: value[order] for key, value in batch.items()}


def test_prepare_writes_shards_the_pipeline_reads_back_exactly(collection, tmp_path):
    folder, samples = collection
    items, skipped = prepare.read_collection(folder)
    assert [Path(i.image).name for i in items][4:6] == ["img04.png", "img04b.png"]
    assert skipped == [(str(folder / "uncaptioned.png"), "no caption file uncaptioned.txt")]
    metadata = prepare.prepare(items, tmp_path, autoencoder=SpaceToDepthAE(), text_encoder=WordTextEncoder(),
                               resolution=32, shard_size=4, skipped=skipped)
    assert metadata["num_records"] == 10 and metadata["num_shards"] == 3
    assert metadata["latent_shape"] == [8, 8, 48] and metadata["text_shape"] == [16, 64]
    assert [path for path, _ in metadata["skipped"]] == [str(folder / "uncaptioned.png"),
                                                         str(folder / "img04b.png")]
    assert "UnidentifiedImageError" in metadata["skipped"][1][1]
    batch = _read_back(tmp_path, 10)
    np.testing.assert_array_equal(batch["prompt_id"], np.arange(10))
    latents = SpaceToDepthAE().encode(np.stack([s.image for s in samples]))
    np.testing.assert_array_equal(batch["latents"], latents)
    text, mask = WordTextEncoder().encode_text([s.prompt for s in samples])
    np.testing.assert_array_equal(batch["text"], text)
    np.testing.assert_array_equal(batch["text_mask"], mask)
    null_text, null_mask = records.read_null_caption(tmp_path)
    assert null_text.shape == (16, 64) and not null_mask.any()


def test_prepare_resumes_by_shard_and_refuses_other_settings(collection, tmp_path):
    folder, _ = collection
    items, _ = prepare.read_collection(folder)
    kwargs = dict(autoencoder=SpaceToDepthAE(), text_encoder=WordTextEncoder(), resolution=32, shard_size=4)
    prepare.prepare(items, tmp_path, **kwargs)
    first = (tmp_path / "data-00000.array_record").stat().st_mtime_ns
    (tmp_path / "data-00001.array_record").unlink()
    (tmp_path / "data-00001.json").unlink()
    metadata = prepare.prepare(items, tmp_path, **kwargs)
    assert metadata["num_records"] == 10
    assert (tmp_path / "data-00001.array_record").exists()
    assert (tmp_path / "data-00000.array_record").stat().st_mtime_ns == first  # not rewritten
    with pytest.raises(ValueError, match="shard_size was 4, now 5"):
        prepare.prepare(items, tmp_path, **dict(kwargs, shard_size=5))


def test_prepare_reads_jsonl_collections(collection, tmp_path):
    folder, samples = collection
    lines = [{"image": str(folder / "img03.png"), "caption": samples[3].prompt},
             {"image": "img01.png", "caption": samples[1].prompt}]
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    items, skipped = prepare.read_collection(jsonl)
    assert [Path(i.image).name for i in items] == ["img01.png", "img03.png"] and not skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "a circle"}\n{"img": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with 'image' and 'caption'"):
        prepare.read_collection(bad)


def test_prepare_data_command_line(collection, tmp_path):
    folder, samples = collection
    command = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(folder), str(tmp_path),
               "--shard_size", "16"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "10 records in 1 shard(s)" in result.stdout
    assert f"skipped {folder / 'img04b.png'}: UnidentifiedImageError" in result.stdout
    assert "prepare: 100%" in result.stderr  # the progress bar
    batch = _read_back(tmp_path, 10)
    text, _ = WordTextEncoder().encode_text([s.prompt for s in samples])
    np.testing.assert_array_equal(batch["text"], text)

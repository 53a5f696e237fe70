"""Orbax checkpoints: exact round trips of params and config, shardings, and clear errors."""

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

from sana_jax import checkpoint
from sana_jax.model.config import preset


def _params(rng: np.random.Generator) -> dict:
    return {
        "patch_embed": {"kernel": rng.normal(size=(2, 2, 4, 16)).astype(np.float32),
                        "bias": rng.normal(size=(16,)).astype(np.float32)},
        "blocks": {"scale_shift_table": rng.normal(size=(3, 6, 16)).astype(ml_dtypes.bfloat16),
                   "ff": {"conv_point": {"kernel": rng.normal(size=(3, 40, 16)).astype(np.float32)}}},
    }


def test_round_trip_is_exact(tmp_path):
    config = dataclasses.replace(preset("tiny"), depth=3, patch_size=2, param_dtype="bfloat16")
    params = _params(np.random.default_rng(0))
    checkpoint.save(tmp_path / "ckpt", config, params)
    loaded_config, loaded = checkpoint.load(tmp_path / "ckpt")
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)


def test_load_restores_into_given_shardings(tmp_path):
    params = _params(np.random.default_rng(1))
    checkpoint.save(tmp_path / "ckpt", dataclasses.replace(preset("tiny"), depth=3), params)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda x: row if x.ndim == 3 else replicated, params)
    _, loaded = checkpoint.load(tmp_path / "ckpt", sharding=shardings)
    for want, got in zip(jax.tree.leaves(shardings), jax.tree.leaves(loaded), strict=True):
        assert got.sharding == want
    _, loaded = checkpoint.load(tmp_path / "ckpt", sharding=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(loaded))


def test_save_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="ckpt exists and is not an empty directory"):
        checkpoint.save(tmp_path / "ckpt", preset("tiny"), _params(np.random.default_rng(2)))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["keep.txt"]


def test_load_names_a_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sana_config.json not found"):
        checkpoint.load(tmp_path / "empty")


def test_staged_moves_on_success_and_leaves_dst_on_failure(tmp_path):
    def refuse(dst):
        raise FileExistsError(f"{dst} is not replaceable")

    dst = tmp_path / "out"
    with checkpoint.staged(dst, refuse) as scratch:
        scratch.mkdir()
        (scratch / "a").write_text("first")
    assert (dst / "a").read_text() == "first"
    with pytest.raises(RuntimeError), checkpoint.staged(dst, refuse) as scratch:
        scratch.mkdir()
        raise RuntimeError("write failed")
    with pytest.raises(FileExistsError), checkpoint.staged(dst, refuse) as scratch:
        scratch.mkdir()
    assert (dst / "a").read_text() == "first"
    with checkpoint.staged(dst, lambda _: None) as scratch:
        scratch.mkdir()
        (scratch / "a").write_text("second")
    assert (dst / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch folders left

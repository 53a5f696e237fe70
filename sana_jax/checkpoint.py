"""Orbax checkpoints of SANA parameters, with their `SanaConfig` recorded beside them.

Layout of a checkpoint directory:
  params/             orbax (StandardCheckpointer) checkpoint of the params pytree
  metadata.json       optional: how the model is meant to be used (e.g. the trainer records its data
                      settings and the sampler it was evaluated with); `load_metadata` reads it
  sana_config.json    `SanaConfig.to_json()`, written last: its presence marks a complete checkpoint
A checkpoint is written beside its path (`.NAME.partial`) and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sana_jax.model.config import SanaConfig

PARAMS_DIR = "params"
CONFIG_FILE = "sana_config.json"
METADATA_FILE = "metadata.json"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def save(path: str | Path, config: SanaConfig, params: Any, *, metadata: dict | None = None,
         overwrite: bool = False) -> None:
    """Writes params (a pytree of JAX or NumPy arrays), config and JSON-able `metadata` to a new or empty
    directory, or with `overwrite` in place of the checkpoint there.

    The checkpoint appears at `path` complete or not at all: a killed save leaves what was there before.
    In a multi-process run every process calls it with the same (global) params; process 0 writes the config.
    """
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or (not overwrite and any(path.iterdir()))):
        raise FileExistsError(f"checkpoint path {path} exists and is not an empty directory")
    partial, replaced = (path.with_name(f".{path.name}.{suffix}") for suffix in ("partial", "replaced"))
    if jax.process_index() == 0:
        for leftover in (partial, replaced):  # from a killed save
            shutil.rmtree(leftover, ignore_errors=True)
    _sync(f"sana_jax.checkpoint.save {path}")  # every process has checked the path before any writes to it
    partial.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(partial / PARAMS_DIR, params)
    if jax.process_index() == 0:
        if metadata is not None:
            (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        (partial / CONFIG_FILE).write_text(config.to_json() + "\n")
        if path.exists():
            path.rename(replaced)
        partial.rename(path)
        shutil.rmtree(replaced, ignore_errors=True)
    _sync(f"sana_jax.checkpoint.save {path} done")


@contextlib.contextmanager
def staged(dst: str | Path, check_replaceable: Callable[[Path], None]) -> Iterator[Path]:
    """Yields a fresh path beside `dst` to write to; moves it to `dst` on success, removes it on failure.

    An existing `dst` is replaced only after `check_replaceable(dst)` returns (it raises to refuse).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield scratch / "out"
        if dst.exists():
            check_replaceable(dst)
            dst.rename(scratch / "replaced")
        (scratch / "out").rename(dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_metadata(path: str | Path) -> dict:
    """The metadata a checkpoint directory was saved with ({} when it has none)."""
    metadata_file = Path(path) / METADATA_FILE
    return json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}


def load_config(path: str | Path) -> SanaConfig:
    """The `SanaConfig` recorded in a checkpoint directory."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a complete SANA checkpoint")
    return SanaConfig.from_dict(json.loads(config_file.read_text()))


def load(path: str | Path, sharding: jax.sharding.Sharding | Any | None = None) -> tuple[SanaConfig, Any]:
    """Reads (config, params) from a checkpoint directory.

    Args:
      path: a directory written by `save`.
      sharding: one `jax.sharding.Sharding` for every leaf, or a pytree of them matching params;
        default: the first local device. Leaves are restored straight into these shardings.

    Returns:
      The config and the params as JAX arrays with the stored shapes and dtypes.
    """
    config = load_config(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(params_dir).item_metadata.tree
        _check_depth(path, config, stored)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, stored)
        targets = jax.tree.map(
            lambda meta, s: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=s), stored, sharding)
        return config, checkpointer.restore(params_dir, targets)


def _check_depth(path: str | Path, config: SanaConfig, stored: Any) -> None:
    """Raises when the blocks stored under params/blocks are not `config.depth` blocks."""
    blocks = stored.get("blocks", {}) if isinstance(stored, dict) else {}
    depths = sorted({leaf.shape[0] for leaf in jax.tree.leaves(blocks) if leaf.shape})
    if depths and depths != [config.depth]:
        raise ValueError(f"{path}: {CONFIG_FILE} says depth={config.depth} but the params stack "
                         f"{' or '.join(map(str, depths))} blocks; the config and the weights disagree")

"""Orbax checkpoints of SANA parameters, with their `SanaConfig` recorded beside them.

Layout of a checkpoint directory:
  params/             orbax (StandardCheckpointer) checkpoint of the params pytree
  metadata.json       optional: how the model is meant to be used (e.g. the trainer records its data
                      settings and the sampler it was evaluated with); `load_metadata` reads it
  sana_config.json    `SanaConfig.to_json()`, written last: its presence marks a complete checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sana_jax.model.config import SanaConfig

PARAMS_DIR = "params"
CONFIG_FILE = "sana_config.json"
METADATA_FILE = "metadata.json"


def save(path: str | Path, config: SanaConfig, params: Any, *, metadata: dict | None = None) -> None:
    """Writes params (a pytree of JAX or NumPy arrays), config and JSON-able `metadata` to a new or empty
    directory.

    In a multi-process run every process calls it with the same (global) params; process 0 writes the config.
    """
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"checkpoint path {path} exists and is not an empty directory")
    if jax.process_count() > 1:  # every process has checked the path before any writes to it
        multihost_utils.sync_global_devices(f"sana_jax.checkpoint.save {path}")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)
    if jax.process_index() == 0:
        if metadata is not None:
            (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        (path / CONFIG_FILE).write_text(config.to_json() + "\n")


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
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.tree.map(lambda _: sharding, stored)
        targets = jax.tree.map(
            lambda meta, s: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=s), stored, sharding)
        return config, checkpointer.restore(params_dir, targets)

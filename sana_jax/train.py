"""Trains a SANA model: `python -m sana_jax.train --config=configs/pretrain.py [--workdir=DIR]
[--config.FIELD=VALUE ...]`.

The workdir (default `workdir/<config name>`) receives checkpoints/ (resumable: re-running the same command
continues from the latest one), metrics.jsonl, tensorboard/, samples/ and the final model/.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID and start one process per host.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sana_jax.trainer import run, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file with get_config()", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")


def _maybe_initialize_distributed() -> None:
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=PATH is required (e.g. --config=configs/grow.py)")
    _maybe_initialize_distributed()
    validate(config, num_devices=jax.device_count())
    workdir = _WORKDIR.value or str(Path("workdir") / Path(flags.FLAGS["config"].config_filename).stem)
    logging.set_verbosity(logging.WARNING)
    run(config, workdir)
    print(f"done: {workdir}")


if __name__ == "__main__":
    app.run(main)

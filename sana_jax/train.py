"""Trains a SANA model: `python -m sana_jax.train --config=configs/pretrain.py [--workdir=DIR]
[--config.FIELD=VALUE ...]`.

The workdir (default `workdir/<config name>`) receives checkpoints/ (resumable: re-running the same command
continues from the latest one), metrics.jsonl, tensorboard/, samples/ and the final model/.
A workdir whose checkpoints hold another model than the config's is refused (--config.resume_saved_model=True
keeps training the saved one). SIGINT (Ctrl-C) or SIGTERM saves a checkpoint at the current step and exits
with status 128 + the signal number.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID and start one process per host.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sana_jax.cli import fail, restart_with_allocator_settings, use_compilation_cache
from sana_jax.trainer import Stopped, WorkdirError, run, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file with get_config()", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error naming the bad flag instead of a traceback."""
    try:
        args = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.keys()  # config_flags reports a file it could not load on first use
        return args
    except flags.Error as error:
        fail(str(error))
    except OSError as error:  # config_flags could not load the file
        reason = str(error).strip().splitlines()[-1].strip()
        fail(f"--config: cannot load the config file ({reason}); expected a Python file with get_config()")
    except (AttributeError, KeyError) as error:  # config_flags: an override of a field the config lacks
        name = str(error).strip("\"'")
        typed = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")
                 and arg.split("=")[0].endswith(f".{name}")]
        fail(f"{typed[0] if typed else name}: the config has no field {name!r} (the fields and their "
              "defaults are in sana_jax/trainer/config.py)")


def _check_workdir(workdir: Path) -> None:
    """Exits with a one-line error unless `workdir` is (or can become) a writable directory."""
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir={workdir} is a file: expected a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as error:
        fail(f"--workdir={workdir}: expected a writable directory ({error.strerror})")


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
    logging.set_verbosity(logging.WARNING)
    _maybe_initialize_distributed()
    try:
        validate(config, num_devices=jax.device_count())
    except ValueError as error:
        fail(str(error))
    workdir = Path(_WORKDIR.value or Path("workdir") / Path(flags.FLAGS["config"].config_filename).stem)
    _check_workdir(workdir)
    try:
        run(config, workdir)
    except WorkdirError as error:
        fail(str(error))
    except Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)
    print(f"done: {workdir}")


if __name__ == "__main__":
    restart_with_allocator_settings()
    use_compilation_cache()
    app.run(main, flags_parser=_parse_flags)

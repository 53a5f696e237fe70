"""Session-wide test settings: one persistent XLA compilation cache for the whole test run.

Many tests train, evaluate and sample the same tiny models, each through jitted functions of its own, so
identical programs would compile again and again (seconds each on two CPU cores). The cache is shared by
the xdist workers and by the subprocesses the tests start (through the environment), and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Set before jax is imported by any test module, so that every process reads them from its environment.
# A size limit turns on jax's file lock, which keeps concurrent writers and readers of one entry apart.
_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
             "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}
_created: list[str] = []  # the folder, in the one process that made it (and removes it)


def pytest_configure(config: pytest.Config) -> None:
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # an xdist worker (inherited), or the caller's own cache
        return
    _created.append(tempfile.mkdtemp(prefix="sana_jax_xla_cache_"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _created[0]
    for name, value in _SETTINGS.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)

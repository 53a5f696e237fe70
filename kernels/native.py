"""Builds and loads the CPU kernels written in C++ against XLA's FFI (`kernels/*.cc`).

A kernel's shared library is compiled on first use with the system's C++ compiler ($CXX, else c++, g++ or
clang++) for the CPU at hand (-march=native) and kept in `sana_jax.cli.cache_dir()/native`, under a name that
hashes the source and the headers next to it (`kernels/*.h`), jaxlib's version (whose FFI headers it is built
against), the compiler and the CPU: a change to any of them builds it anew, and hosts sharing a home folder keep
one library per kind of CPU. Concurrent builds are serialised by a file lock, and a library lands by an atomic
rename.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess

import filelock
import jax
import jaxlib

from sana_jax import cli

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


class NativeBuildError(RuntimeError):
    """A kernel's library cannot be built or loaded here."""


def compiler(environ: dict[str, str] | None = None) -> str:
    """The C++ compiler's path: $CXX, else the first of c++, g++, clang++ on PATH; NativeBuildError if none."""
    environ = os.environ if environ is None else environ
    names = [environ["CXX"]] if environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise NativeBuildError(f"no C++ compiler found (tried {', '.join(names)}; set CXX to one)")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(sorted(set(lines)))


def _build(source: str, target: str, cxx: str) -> None:
    command = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), source, "-o", target + ".partial"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{' '.join(command)}: {e}") from None
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise NativeBuildError(f"{os.path.basename(cxx)} failed on {source}: {' | '.join(errors[:3])}")
    os.replace(target + ".partial", target)


@functools.cache
def library(name: str) -> ctypes.CDLL:
    """kernels/`name`.cc's library, loaded, built first where no build of it is cached.

    Raises NativeBuildError (one line: what failed) when there is no compiler or the build or load fails.
    """
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".cc")
    cxx = compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBuildError(f"{cxx} --version: {e}") from None
    key = hashlib.sha256()
    for path in [source, *sorted(glob.glob(os.path.join(os.path.dirname(source), "*.h")))]:
        with open(path, "rb") as f:
            key.update(f.read())
    for part in (jaxlib.__version__, cxx, version, " ".join(FLAGS), _cpu_signature()):
        key.update(part.encode())
    folder = os.path.join(cli.cache_dir(os.environ), "native")
    target = os.path.join(folder, f"{name}-{key.hexdigest()[:16]}.so")
    try:
        os.makedirs(folder, exist_ok=True)
        with filelock.FileLock(target + ".lock"):
            if not os.path.exists(target):
                _build(source, target, cxx)
    except OSError as e:
        raise NativeBuildError(f"cannot build in {folder}: {e}") from None
    try:
        return ctypes.CDLL(target)
    except OSError as e:
        raise NativeBuildError(f"cannot load {target}: {e}") from None


@functools.cache
def registration_failure(name: str, handlers: tuple[tuple[str, str], ...]) -> str | None:
    """Builds and loads kernels/`name`.cc's library and registers each (target, symbol) of `handlers`, the FFI
    handler `symbol` as the CPU custom-call target `target`; why that failed (one line), or None."""
    try:
        loaded = library(name)
    except NativeBuildError as e:
        return str(e)
    for target, symbol in handlers:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    return None

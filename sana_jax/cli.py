"""What the command lines share: absl flags parsed with user mistakes reported as one line (exit status 2),
the allocator setting that long CPU runs want, and a compilation cache kept between runs.

Each command defines its flags on its own `flags.FlagValues` (so one process can import several commands and
parse a command line more than once, as the tests do) and parses them with `parse`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull")
# glibc (>= 2.35) tunable: malloc asks for transparent huge pages on the large blocks it maps.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# The commands' compilation cache holds at most this much; the least recently used programs go first.
COMPILATION_CACHE_MAX_BYTES = 2 << 30


def fail(message: str) -> NoReturn:
    """Ends the command with a one-line error on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(values: flags.FlagValues, argv: Sequence[str] | None, doc: str, *, positional: bool = False) -> list[str]:
    """Parses `argv` (the arguments after the program name; None: `sys.argv[1:]`) into `values`.

    Returns the positional arguments, which only a command with `positional` takes. --help prints `doc` and the
    flags to stdout and exits 0; an unknown flag, a bad value, a missing required flag or an unexpected
    positional argument ends the command through `fail`.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in args[:args.index("--") if "--" in args else len(args)]):
        print(f"{doc.strip()}\n\nflags:\n{values.get_help(include_special_flags=False).strip()}")
        sys.exit(0)
    try:
        rest = values([sys.argv[0], *args])[1:]
    except flags.Error as error:
        fail(str(error))
    if rest and not positional:
        fail(f"unexpected arguments {rest}: every setting is a --flag")
    return rest


def huge_pages_environment(environ: Mapping[str, str], platform: str = sys.platform) -> dict[str, str] | None:
    """`environ` with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES; None on other systems than Linux or when
    GLIBC_TUNABLES already sets glibc.malloc.hugetlb (=0 keeps it off)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if platform != "linux" or "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, same command line) with `huge_pages_environment`, if it differs.

    Call it first thing in a command's `__main__`, before any thread starts. XLA's CPU runtime allocates a step's
    temporaries afresh at every call (230 MB for the main job's training step) and glibc maps such blocks anew
    each time, so every step faults in and zeroes them 4 KiB at a time: a quarter of the CPU time went to the
    kernel. Backed by 2 MiB pages, the training step runs 20-30 % faster (docs/performance.md). Other C
    libraries ignore the variable, and a kernel with transparent huge pages off ignores the request.
    """
    environ = huge_pages_environment(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def compilation_cache_dir(environ: Mapping[str, str]) -> str | None:
    """Where the commands keep jax's persistent compilation cache: $XDG_CACHE_HOME/sana_jax/xla (~/.cache when
    XDG_CACHE_HOME is unset), or None when JAX_COMPILATION_CACHE_DIR is set (jax reads that one itself; an empty
    value turns the cache off)."""
    if "JAX_COMPILATION_CACHE_DIR" in environ:
        return None
    root = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sana_jax", "xla")


def use_compilation_cache() -> None:
    """Keeps every program that takes jax a second or more to compile in `compilation_cache_dir`, for the next run.

    Call it in a command's `__main__`, before anything compiles. A rerun, or a resume after Ctrl-C, SIGTERM or a
    crash, then loads its programs instead of compiling them again: the main job's take two minutes and more
    on two CPU cores (docs/performance.md). Entries are keyed by the program, the jax and XLA versions and
    the device, and XLA refuses one compiled for another CPU.
    """
    path = compilation_cache_dir(os.environ)
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    # A size limit also makes jax lock entries against concurrent writers (two commands run at once).
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)

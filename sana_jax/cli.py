"""What the command lines share: absl flags parsed with user mistakes reported as one line (exit status 2),
the allocator settings that long CPU runs want, and a compilation cache kept between runs.

Each command defines its flags on its own `flags.FlagValues` (so one process can import several commands and
parse a command line more than once, as the tests do) and parses them with `parse`.

`python -m sana_jax.cli COMMAND [ARGS...]` runs any other program (Jupyter, a script) with the allocator settings.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull")
# glibc (>= 2.35) tunable: malloc asks for transparent huge pages on the large blocks it maps.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# gperftools' tcmalloc (Debian and Ubuntu: libtcmalloc-minimal4), preloaded where installed.
TCMALLOC = "tcmalloc_minimal"
# tcmalloc reports each allocation above this many bytes on stderr; XLA's scratch for the larger models outgrows
# its default (1 GiB).
TCMALLOC_REPORT_BYTES = str(1 << 40)
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


def find_tcmalloc() -> str | None:
    """The shared library of gperftools' tcmalloc as the dynamic loader names it (libtcmalloc_minimal.so.4), or
    None where it is not installed."""
    return ctypes.util.find_library(TCMALLOC)


def allocator_environment(environ: Mapping[str, str], platform: str = sys.platform,
                          tcmalloc: str | None = None) -> dict[str, str] | None:
    """`environ` with the allocator settings for XLA's CPU runtime, or None where it already has them (or off Linux).

    Adds LD_PRELOAD=`tcmalloc` when one is given and the caller sets no LD_PRELOAD (an empty one keeps glibc's
    malloc), with TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD raised unless set; and `HUGE_PAGES_TUNABLE` to
    GLIBC_TUNABLES unless the caller sets glibc.malloc.hugetlb (=0 keeps it off), for glibc's malloc.
    """
    if platform != "linux":
        return None
    added = {}
    if tcmalloc and "LD_PRELOAD" not in environ:
        added["LD_PRELOAD"] = tcmalloc
        added["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                     TCMALLOC_REPORT_BYTES)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        added["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return {**environ, **added} if added else None


def restart_with_allocator_settings() -> None:
    """Re-executes this process (same interpreter, same command line) with `allocator_environment`, if it differs.

    Call it first thing in a command's `__main__`, before any thread starts. XLA's CPU runtime allocates a
    program's temporaries afresh at every call (230 MiB for the pretrain model's forward+backward, 650 MiB for
    the `small` preset's), and glibc maps blocks that large anew each time, so the kernel faults in and zeroes
    them at every call. tcmalloc keeps freed blocks for the next call: system time falls from about 0.3 to
    0.01-0.07 s per second and the `small` preset's forward+backward runs 17-18 % faster. Without tcmalloc,
    glibc's huge-page tunable makes the faults 512x fewer (docs/performance.md). A kernel with transparent huge
    pages off ignores the tunable, and other C libraries ignore the variable.
    """
    environ = _allocator_environment_here()
    if environ is not None:
        _exec([sys.executable, *sys.orig_argv[1:]], environ)


def _allocator_environment_here() -> dict[str, str] | None:
    """`allocator_environment` of this process. The library search (it runs ldconfig) is skipped when the caller
    sets LD_PRELOAD, which wins anyway."""
    tcmalloc = find_tcmalloc() if "LD_PRELOAD" not in os.environ else None
    return allocator_environment(os.environ, tcmalloc=tcmalloc)


def _exec(argv: Sequence[str], environ: Mapping[str, str]) -> NoReturn:
    """Replaces this process with `argv` (looked up on PATH) under `environ`, after flushing what it printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], list(argv), environ)


def malloc_in_use() -> str:
    """Which malloc this process runs with: "tcmalloc" when tcmalloc is loaded, else "system"."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if any("libtcmalloc" in line for line in maps) else "system"
    except OSError:
        return "system"


def compilation_cache_dir(environ: Mapping[str, str]) -> str | None:
    """Where the commands keep jax's persistent compilation cache: $XDG_CACHE_HOME/sana_jax/xla (~/.cache when
    XDG_CACHE_HOME is unset), or None when JAX_COMPILATION_CACHE_DIR is set (jax reads that one itself; an empty
    value turns the cache off)."""
    if "JAX_COMPILATION_CACHE_DIR" in environ:
        return None
    return os.path.join(cache_dir(environ), "xla")


def cache_dir(environ: Mapping[str, str]) -> str:
    """sana-jax's folder of build and compilation caches: $XDG_CACHE_HOME/sana_jax (~/.cache when unset)."""
    root = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sana_jax")


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


def main(argv: Sequence[str]) -> NoReturn:
    """`python -m sana_jax.cli COMMAND [ARGS...]`: runs COMMAND with `allocator_environment`, e.g. `jupyter lab`
    or `python my_script.py`."""
    if not argv:
        fail("expected a command to run with the allocator settings, e.g. python -m sana_jax.cli jupyter lab")
    try:
        _exec(argv, _allocator_environment_here() or os.environ)
    except OSError as error:
        fail(f"{argv[0]}: {error.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The commands' restart with glibc's huge-page tunable, checked against the kernel's own page accounting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from sana_jax import cli

# Prints its pid, restarts, then maps a 64 MiB block through malloc, touches it and prints how much of the
# block's mapping the kernel backs with huge pages (AnonHugePages of /proc/self/smaps, kB).
CHILD = textwrap.dedent("""
    import ctypes, os, re
    from sana_jax import cli
    print("pid", os.getpid(), flush=True)
    cli.restart_with_huge_pages()
    size = 64 << 20
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    kb, inside = 0, False
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            kb = int(line.split()[1])
    print("huge", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), kb)
""")


def _run_child(tunables: str | None) -> tuple[list[int], str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split("\n")
    pids = [int(line.split()[1]) for line in out if line.startswith("pid ")]
    _, pid, seen, kb = next(line for line in out if line.startswith("huge ")).split(" ")
    return pids + [int(pid)], seen, int(kb)


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return re.search(r"\[(\w+)\]", path.read_text()).group(1) if path.exists() else "never"


def test_huge_pages_environment_adds_the_tunable_once():
    assert cli.huge_pages_environment({"A": "1"}, "linux") == {"A": "1", "GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}
    assert cli.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux") == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{cli.HUGE_PAGES_TUNABLE}"}
    assert cli.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux") is None
    assert cli.huge_pages_environment({}, "darwin") is None


def test_restart_sets_the_tunable_in_the_same_process_and_the_kernel_backs_large_blocks():
    if sys.platform != "linux":
        assert _run_child(None)[1] == ""
        return
    mode = _thp_mode()
    pids, seen, kb = _run_child(None)
    assert len(pids) == 3 and len(set(pids)) == 1, pids  # printed before and after the exec, one process
    assert seen == cli.HUGE_PAGES_TUNABLE
    assert (kb > 0) == (mode in ("always", "madvise")), (mode, kb)
    # The caller's own setting wins: no restart, and huge pages only where the kernel gives them to everyone.
    pids, seen, kb = _run_child("glibc.malloc.hugetlb=0")
    assert len(pids) == 2 and seen == "glibc.malloc.hugetlb=0"
    assert (kb > 0) == (mode == "always"), (mode, kb)


def test_compilation_cache_dir_follows_xdg_and_leaves_jax_own_variable_alone():
    assert cli.compilation_cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == "/c/sana_jax/xla"
    assert cli.compilation_cache_dir({"HOME": "/h"}) == "/h/.cache/sana_jax/xla"
    assert cli.compilation_cache_dir({"XDG_CACHE_HOME": "", "HOME": "/h"}) == "/h/.cache/sana_jax/xla"
    assert cli.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/mine", "XDG_CACHE_HOME": "/c"}) is None
    assert cli.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": ""}) is None  # jax's cache off


# Turns the commands' cache on, compiles one program and prints what jax's compilation cache reported.
CACHE_CHILD = textwrap.dedent("""
    from sana_jax import cli
    cli.use_compilation_cache()
    import jax, jax.numpy as jnp
    from jax._src import monitoring
    events = []
    monitoring.register_event_listener(lambda event, **kwargs: events.append(event.rsplit("/", 1)[-1]))
    x = jnp.arange(64.0).reshape(8, 8)
    print(float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)), events.count("cache_hits"),
          events.count("cache_misses"))
""")


def test_a_second_run_loads_its_programs_from_the_commands_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run() -> tuple[float, int, int]:
        out = subprocess.run([sys.executable, "-c", CACHE_CHILD], env=env, capture_output=True, text=True,
                             check=True, timeout=120).stdout.split()
        return float(out[0]), int(out[1]), int(out[2])

    value, hits, misses = run()
    folder = tmp_path / "sana_jax" / "xla"
    entries = sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache"))
    assert hits == 0 and misses >= 1 and any(name.startswith("jit__lambda") for name in entries), (hits, entries)
    again, hits, misses = run()
    assert again == value and hits >= 1 and misses == 0, (hits, misses)
    # The caller's own setting wins: with jax's variable empty the cache is off and nothing more is written.
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    assert run() == (value, 0, 0)
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache")) == entries

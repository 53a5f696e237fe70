"""The commands' restart with their allocator settings (tcmalloc, glibc's huge-page tunable), checked against the
kernel's own accounting: which libraries the process maps, its page faults and its huge pages."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sana_jax import cli

ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")

# Prints its pid, restarts, then allocates a 64 MiB block through malloc, touches it, frees it, allocates and
# touches one again, and prints the page faults of that second touch, how much of the second block's mapping the
# kernel backs with huge pages (AnonHugePages of /proc/self/smaps, kB), whether tcmalloc is mapped, and the
# allocator variables it runs with.
CHILD = textwrap.dedent("""
    import ctypes, os, re, resource, sys
    from sana_jax import cli
    print("pid", os.getpid(), flush=True)
    cli.restart_with_allocator_settings()
    size = 64 << 20
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    libc.free(address)
    address = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(address, 2, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    kb, inside = 0, False
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            kb = int(line.split()[1])
    tcmalloc = any("libtcmalloc" in line for line in open("/proc/self/maps"))
    print("child", os.getpid(), faults, kb, tcmalloc, {k: os.environ.get(k) for k in sys.argv[1:]})
""")


def _run_child(**variables: str) -> tuple[list[int], int, int, bool, dict]:
    """Runs CHILD with the allocator variables unset but for `variables`: (pids, faults, kB, tcmalloc, variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}
    env.update(variables)
    out = subprocess.run([sys.executable, "-c", CHILD, *ALLOCATOR_VARIABLES], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split("\n")
    pids = [int(line.split()[1]) for line in out if line.startswith("pid ")]
    _, pid, faults, kb, tcmalloc, seen = next(line for line in out if line.startswith("child ")).split(" ", 5)
    return pids + [int(pid)], int(faults), int(kb), tcmalloc == "True", ast.literal_eval(seen)


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return re.search(r"\[(\w+)\]", path.read_text()).group(1) if path.exists() else "never"


def test_allocator_environment_adds_each_setting_once_and_leaves_the_callers_own():
    report = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": cli.TCMALLOC_REPORT_BYTES}
    huge = {"GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}
    assert cli.allocator_environment({"A": "1"}, "linux") == {"A": "1", **huge}
    assert cli.allocator_environment({"A": "1"}, "linux", "libtc.so") == {
        "A": "1", "LD_PRELOAD": "libtc.so", **report, **huge}
    assert cli.allocator_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5", **huge}, "linux", "t.so") == {
        "LD_PRELOAD": "t.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5", **huge}
    assert cli.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux") == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{cli.HUGE_PAGES_TUNABLE}"}
    # Set by the caller, even empty: nothing more to add, no restart.
    assert cli.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": ""}, "linux",
                                     "libtc.so") is None
    assert cli.allocator_environment({}, "darwin", "libtc.so") is None


@pytest.mark.skipif(sys.platform != "linux", reason="the allocator settings are Linux's")
def test_restart_preloads_tcmalloc_where_installed_and_freed_blocks_come_back_without_page_faults():
    tcmalloc = cli.find_tcmalloc()
    pids, faults, kb, mapped, seen = _run_child()
    assert len(pids) == 3 and len(set(pids)) == 1, pids  # printed before and after the exec, one process
    assert mapped == (tcmalloc is not None) and seen["LD_PRELOAD"] == tcmalloc, (tcmalloc, seen)
    assert seen["GLIBC_TUNABLES"] == cli.HUGE_PAGES_TUNABLE
    if tcmalloc is not None:
        assert seen["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == cli.TCMALLOC_REPORT_BYTES
        assert faults < 64, faults  # the freed block itself, already backed: 16384 pages of 4 KiB otherwise
    # The caller's own settings win: no restart; glibc maps the second block afresh, on huge pages only where
    # the kernel gives them to everyone, and the kernel faults it in again.
    pids, faults, kb, mapped, seen = _run_child(LD_PRELOAD="", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert len(pids) == 2 and not mapped and seen["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    mode = _thp_mode()
    assert (kb > 0) == (mode == "always"), (mode, kb)
    assert faults >= (32 if mode == "always" else 16384), (mode, faults)


@pytest.mark.skipif(sys.platform != "linux", reason="the allocator settings are Linux's")
def test_glibc_tunable_backs_large_blocks_with_huge_pages_when_tcmalloc_is_kept_out():
    mode = _thp_mode()
    pids, faults, kb, mapped, seen = _run_child(LD_PRELOAD="")
    assert len(pids) == 3 and len(set(pids)) == 1 and not mapped, (pids, mapped)
    assert seen["GLIBC_TUNABLES"] == cli.HUGE_PAGES_TUNABLE and seen["LD_PRELOAD"] == ""
    assert (kb > 0) == (mode in ("always", "madvise")), (mode, kb)
    # 2 MiB pages: a few hundred faults for the 64 MiB block instead of 16384.
    assert (faults < 16384) == (mode in ("always", "madvise")), (mode, faults)


def test_the_module_runs_a_command_with_the_allocator_settings():
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}
    shown = subprocess.run([sys.executable, "-m", "sana_jax.cli", sys.executable, "-c",
                            "import os; from sana_jax import cli; e = os.environ; "
                            "print(e.get('LD_PRELOAD'), e.get('GLIBC_TUNABLES'), cli.malloc_in_use())"],
                           env=env, capture_output=True, text=True, timeout=60)
    tcmalloc = cli.find_tcmalloc()
    expected = (f"{tcmalloc} {cli.HUGE_PAGES_TUNABLE} {'system' if tcmalloc is None else 'tcmalloc'}"
                if sys.platform == "linux" else "None None system")
    assert shown.returncode == 0 and shown.stdout.strip() == expected, shown
    missing = subprocess.run([sys.executable, "-m", "sana_jax.cli", "no-such-command-here"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: no-such-command-here: No such file or directory"], missing


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

"""The wall-clock timers of the benchmarks in tools/bench/: one callable, or several in alternation."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def median_ms(fn: Callable[[], Any], sync: Callable[[Any], Any] = jax.block_until_ready, *, warmup: int = 2,
              repeats: int = 5, inner: int = 1) -> float:
    """Median over `repeats` samples of the mean wall time of `inner` back-to-back `fn()` calls, in ms.

    `warmup` untimed calls come first (compilation, autotuning). `sync(out)` waits until a result is ready:
    after every warm-up call and after the last call of each sample. The default blocks on JAX arrays; pass
    e.g. `lambda _: torch.cuda.synchronize()` for torch.
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be at least 1, got {repeats} and {inner}")
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(out)
        samples.append((time.perf_counter() - start) / inner)
    return 1e3 * float(np.median(samples))


def interleaved_ms(fns: Mapping[str, tuple[Callable[[], Any], Callable[[Any], Any]]], *, rounds: int = 3,
                   repeats: int = 5, warmup: int = 2) -> dict[str, list[float]]:
    """Times several `(fn, sync)` pairs in alternation: name -> one `median_ms` per round, in ms.

    Each round times every pair in turn (`repeats` calls each), so a host whose speed drifts during the run
    (other tenants, clock changes) slows all of them alike and their per-round ratios stay comparable.
    `warmup` untimed calls of each pair come first, once.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for fn, sync in fns.values():
        for _ in range(warmup):
            sync(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, sync) in fns.items():
            samples[name].append(median_ms(fn, sync, warmup=0, repeats=repeats))
    return samples

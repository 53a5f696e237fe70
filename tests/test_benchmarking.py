"""sana_jax.benchmarking: the benchmarks' timers."""

import time

import jax.numpy as jnp
import pytest

from sana_jax.benchmarking import interleaved_ms, median_ms


def test_median_ms_counts_calls_syncs_and_reports_milliseconds():
    calls, synced = [], []

    def fn():
        calls.append(None)
        time.sleep(0.002)
        return len(calls)

    ms = median_ms(fn, synced.append, warmup=2, repeats=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert synced == [1, 2, 6, 10, 14]  # every warm-up call, then the last call of each sample
    assert 1.5 < ms < 100


def test_median_ms_blocks_on_jax_outputs_by_default():
    assert median_ms(lambda: jnp.ones(8) * 2, warmup=1, repeats=2) >= 0


def test_median_ms_rejects_no_samples():
    with pytest.raises(ValueError, match="repeats"):
        median_ms(lambda: None, repeats=0)


def test_interleaved_ms_alternates_the_calls_round_by_round():
    order = []

    def call(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
            return name
        return fn

    fns = {"a": (call("a", 0.001), lambda _: None), "b": (call("b", 0.02), lambda _: None)}
    samples = interleaved_ms(fns, rounds=3, repeats=2, warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-ups, then each round times a, then b
    assert list(samples) == ["a", "b"] and all(len(v) == 3 for v in samples.values())
    assert all(b > a for a, b in zip(samples["a"], samples["b"], strict=True))  # 20 ms sleeps read longer than 1 ms


def test_interleaved_ms_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_ms({"a": (lambda: None, lambda _: None)}, rounds=0)

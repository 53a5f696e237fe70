"""sana_jax.benchmarking.median_ms: the benchmarks' one timer."""

import time

import jax.numpy as jnp
import pytest

from sana_jax.benchmarking import median_ms


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

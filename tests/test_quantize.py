"""Block-wise 8-bit quantisation: round-trip error bounds against NumPy block statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.optim.quantize import (
    SANA_SCHEME,
    Scheme,
    dequantize_blockwise,
    dynamic_tree_levels,
    quantize_blockwise,
)

quantize_blockwise = jax.jit(quantize_blockwise, static_argnums=1)
dequantize_blockwise = jax.jit(dequantize_blockwise, static_argnums=1)
SCHEMES = [Scheme("dynamic", 64), Scheme("linear", 64), Scheme("minmax", 64), Scheme("dynamic"),
           Scheme("minmax", 16, whole_columns=True), SANA_SCHEME]


def _cases(rng: np.random.Generator):
    """Arrays of shape (..., rows, cols) with cols not a multiple of the block sizes used above."""
    shape = (3, 5, 150)
    yield "normal", rng.standard_normal(shape)
    for exponent in (-30, -12, 0, 12, 30):
        yield f"scale 1e{exponent}", rng.standard_normal(shape) * 10.0**exponent
    yield "per-row scales", rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 8, (3, 5, 1))
    yield "zeros", np.zeros(shape)
    yield "constant", np.full(shape, 0.37)
    yield "negative constant", np.full(shape, -2.5)
    yield "heavy tails", rng.standard_cauchy(shape)
    blocky = rng.standard_normal(shape)
    blocky[:, :, :64] = 0.0
    blocky[1] = 0.0
    yield "all-zero blocks", blocky
    yield "positive", rng.uniform(1.0, 2.0, shape)


def _numpy_blocks(x: np.ndarray, scheme: Scheme) -> list[tuple[tuple, np.ndarray]]:
    """(index, block values) per block, re-derived with explicit loops over the block layout."""
    size = x.shape[-1] if scheme.block_size is None else min(scheme.block_size, x.shape[-1])
    starts = range(0, x.shape[-1], size)
    if scheme.whole_columns:
        return [((*lead, j), x[lead][:, s:s + size]) for lead in np.ndindex(x.shape[:-2])
                for j, s in enumerate(starts)]
    return [((*lead, j), x[lead][s:s + size]) for lead in np.ndindex(x.shape[:-1])
            for j, s in enumerate(starts)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_error_bounds(scheme):
    rng = np.random.default_rng(0)
    levels = dynamic_tree_levels().astype(np.float64)
    for name, x in _cases(rng):
        x = x.astype(np.float32)
        q = quantize_blockwise(jnp.asarray(x), scheme)
        y = np.asarray(dequantize_blockwise(q, scheme))
        assert q.codes.shape == x.shape and q.codes.dtype.itemsize == 1, name
        assert np.all(np.isfinite(y)), f"{name}: non-finite values after the round trip"
        y_blocks = dict(_numpy_blocks(y, scheme))
        for index, block in _numpy_blocks(x, scheme):
            block = block.astype(np.float64)
            error = np.abs(y_blocks[index] - block)
            if scheme.code == "minmax":
                bound = (block.max() - block.min()) / 510
                assert np.isclose(q.offset[index], block.min(), rtol=1e-6), name
            else:
                absmax = np.abs(block).max()
                assert np.isclose(q.scale[index] * (127 if scheme.code == "linear" else 1), absmax, rtol=1e-6)
                if scheme.code == "linear":
                    bound = absmax / 254
                else:  # the nearest level: no other level is closer.
                    nearest = np.abs(levels[None] - (block / max(absmax, 1e-38)).reshape(-1, 1)).min(axis=1)
                    bound = nearest.reshape(block.shape) * absmax
            assert np.all(error <= bound * (1 + 1e-5) + 1e-6 * np.abs(block) + 1e-45), (
                f"{name}, block {index}: error {error.max()} above the bound {np.max(bound)}")
            if not block.any():
                assert not y_blocks[index].any(), f"{name}: an all-zero block does not decode to zeros"


def test_dynamic_levels():
    levels = dynamic_tree_levels()
    assert levels.shape == (256,) and np.all(np.diff(levels) > 0)
    assert levels[-1] == 1.0 and levels[127] == 0.0
    positive = levels[128:255]
    # Seven decades, 2**e equal steps in decade e: spacing is constant within one.
    for e in range(7):
        decade = positive[(positive >= 10.0 ** (e - 7)) & (positive < 10.0 ** (e - 6))]
        assert len(decade) == 2**e
        np.testing.assert_allclose(np.diff(decade), 0.9 * 10.0 ** (e - 6) / 2**e, rtol=1e-4)
    np.testing.assert_allclose(-levels[:127], positive[::-1])


def test_dynamic_levels_equal_bitsandbytes_signed_dynamic_map():
    """bitsandbytes' `create_dynamic_map(signed=True)` (functional.py; 7 exponent bits, 8 bits in all), from its
    published definition: for i = 0..6 the midpoints of the 2**i + 1 equally spaced points of [0.1, 1], times
    10**(i - 6), with both signs (no extra linear items: 2**(7 - 7) - 1 = 0), then 0 and 1, sorted; built in
    float32. NumPy rounds its float64 grid where torch steps in float32: one float32 ulp (6e-8 near 1) apart."""
    levels = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1).astype(np.float32)
        magnitudes = np.float32(10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / np.float32(2))
        levels += [*magnitudes, *-magnitudes]
    expected = np.sort(np.array(levels, np.float32))
    assert expected.shape == (256,)
    np.testing.assert_allclose(dynamic_tree_levels(), expected, rtol=0, atol=6e-8)


def test_dynamic_code_picks_nearest_level():
    rng = np.random.default_rng(1)
    levels = dynamic_tree_levels()
    log_uniform = np.sign(rng.standard_normal(20000)) * 10 ** rng.uniform(-9, 0, 20000)
    y = np.concatenate([rng.uniform(-1, 1, 20000), log_uniform, levels, (levels[1:] + levels[:-1]) / 2,
                        10.0 ** -np.arange(9), -(10.0 ** -np.arange(9))])
    y = y.astype(np.float32)  # contains 1: the block's absmax, so y itself is the normalised value
    scheme = Scheme("dynamic", y.size)
    q = quantize_blockwise(jnp.asarray(y), scheme)
    chosen = levels[np.asarray(q.codes)]
    assert np.all(np.abs(chosen - y) <= np.abs(levels[None] - y[:, None]).min(axis=1))
    np.testing.assert_array_equal(np.asarray(dequantize_blockwise(q, scheme)), chosen)


def test_scale_shapes():
    x = jnp.ones((4, 6, 600))
    assert quantize_blockwise(x, Scheme("dynamic", 256)).scale.shape == (4, 6, 3)
    assert quantize_blockwise(x, Scheme("linear", 1024)).scale.shape == (4, 6, 1)
    assert quantize_blockwise(x, Scheme("dynamic")).scale.shape == (4, 6, 1)
    q = quantize_blockwise(x, Scheme("minmax", 256, whole_columns=True))
    assert q.scale.shape == q.offset.shape == (4, 3)


def test_bad_input():
    with pytest.raises(ValueError, match="'int4'"):
        Scheme("int4")
    with pytest.raises(ValueError, match="block_size=0"):
        Scheme("linear", 0)
    with pytest.raises(ValueError, match=r"\(7,\)"):
        quantize_blockwise(jnp.ones(7), SANA_SCHEME)

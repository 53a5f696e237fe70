"""Block-wise 8-bit quantisation of float32 arrays, as pure jnp functions.

An array is cut into blocks of `block_size` consecutive elements along its last axis (the tail block is
shorter when `block_size` does not divide it; None makes each row one block); each block keeps one or
two float32 numbers and every element one byte. The codes array keeps the input's shape, so it shards
like the input; the per-block numbers have shape (..., num_blocks).

Codes:
  "dynamic": signed dynamic-tree code (Dettmers et al., 8-bit optimizers): 256 levels in [-1, 1] with
    an exponent of up to six decimal places and a linear fraction; x / absmax of the block is rounded to
    the nearest level. Relative precision is roughly constant over six decades.
  "linear": symmetric int8, x / absmax * 127 rounded to the nearest integer.
  "minmax": unsigned uint8 over [min, max] of the block, step (max - min) / 255 (SANA's CAME-8bit).

`whole_columns=True` makes each block `block_size` columns of the trailing (rows, cols) matrix times all
its rows: SANA's chunk of 2048 rows of a PyTorch (out, in) weight is 2048 columns of our (in, out) kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODES = ("dynamic", "linear", "minmax")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """An 8-bit code and its block layout (see the module docstring)."""

    code: str = "dynamic"
    block_size: int | None = None  # None: one block per row (the whole last axis)
    whole_columns: bool = False

    def __post_init__(self):
        if self.code not in CODES:
            raise ValueError(f"Scheme.code={self.code!r}: expected one of {CODES}")
        if self.block_size is not None and not (isinstance(self.block_size, int) and self.block_size > 0):
            raise ValueError(f"Scheme.block_size={self.block_size!r}: expected a positive integer or None")


SANA_SCHEME = Scheme(code="minmax", block_size=2048, whole_columns=True)


class Quantized(NamedTuple):
    """An 8-bit array: codes of the array's shape, per-block scale and (for "minmax") offset.

    Dequantised value: offset + scale * level(code), with level in [-1, 1] for "dynamic" and "linear"
    (no offset: None) and level in {0, ..., 255} for "minmax".
    """

    codes: jax.Array
    scale: jax.Array
    offset: jax.Array | None = None


@functools.cache
def dynamic_tree_levels() -> np.ndarray:
    """The 256 sorted float32 levels of the signed dynamic-tree code.

    For e in 0..6 the magnitudes 10**(e - 6) * f, with f the midpoints of 2**e equal steps of [0.1, 1],
    give 127 positive levels; their negatives, 0 and 1 complete the 256.
    """
    magnitudes = []
    for exponent in range(7):
        edges = np.linspace(0.1, 1.0, 2**exponent + 1)
        magnitudes.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (exponent - 6))
    magnitudes = np.concatenate(magnitudes)
    return np.sort(np.concatenate([-magnitudes, [0.0], magnitudes, [1.0]])).astype(np.float32)


def _nearest_dynamic_level(y: jax.Array) -> jax.Array:
    """Index (uint8) of the dynamic-tree level nearest to each y in [-1, 1].

    The decade e and the bin k inside it give a candidate at most one place from the nearest level in
    the sorted table (127 negatives, 0 at index 127, 127 positives, 1); the nearest of the candidate and
    its two neighbours is exact. Comparisons and table look-ups only: no transcendental functions.
    """
    magnitude = jnp.abs(y)
    decade = sum((magnitude >= np.float32(10.0 ** (e - 7))).astype(jnp.int32) for e in range(1, 7))
    unit = jnp.asarray(10.0 ** np.arange(-6, 1), jnp.float32)[decade]
    bins = jnp.left_shift(1, decade)
    k = jnp.clip(jnp.floor((magnitude / unit - 0.1) * (bins / 0.9)).astype(jnp.int32), 0, bins - 1)
    rank = bins - 1 + k
    candidate = jnp.where(y >= 0, 128 + rank, 126 - rank)
    levels = jnp.asarray(dynamic_tree_levels())
    best, best_error = candidate, jnp.abs(levels[candidate] - y)
    for shift in (-1, 1):
        neighbour = jnp.clip(candidate + shift, 0, 255)
        error = jnp.abs(levels[neighbour] - y)
        best = jnp.where(error < best_error, neighbour, best)
        best_error = jnp.minimum(error, best_error)
    return best.astype(jnp.uint8)


def _to_blocks(x: jax.Array, scheme: Scheme) -> jax.Array:
    """(..., n) -> (..., num_blocks, min(block_size, n)); a short tail block is padded with its last
    element, which changes neither its absmax nor its min and max."""
    n = x.shape[-1]
    block_size = n if scheme.block_size is None else min(scheme.block_size, n)
    num_blocks = -(-n // block_size)
    pad = num_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge")
    return x.reshape(*x.shape[:-1], num_blocks, block_size)


def _from_blocks(blocks: jax.Array, n: int) -> jax.Array:
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :n]


def _block_axes(scheme: Scheme) -> tuple[int, ...]:
    """Axes of the blocked array (..., [rows,] num_blocks, block_size) that a block's statistic spans."""
    return (-3, -1) if scheme.whole_columns else (-1,)


def _check_input(x: jax.Array, scheme: Scheme):
    min_ndim = 2 if scheme.whole_columns else 1
    if x.ndim < min_ndim:
        raise ValueError(f"cannot quantise an array of shape {x.shape} with {scheme}: expected at least "
                         f"{min_ndim} axes")


def quantize_blockwise(x: jax.Array, scheme: Scheme) -> Quantized:
    """Quantises `x` (..., n) to 8 bits per element; all-zero blocks decode to exact zeros."""
    _check_input(x, scheme)
    x = x.astype(jnp.float32)
    blocks = _to_blocks(x, scheme)
    axes = _block_axes(scheme)
    if scheme.code == "minmax":
        low = jnp.min(blocks, axis=axes, keepdims=True)
        step = (jnp.max(blocks, axis=axes, keepdims=True) - low) / 255.0
        levels = jnp.where(step > 0, (blocks - low) / jnp.where(step > 0, step, 1.0), 0.0)
        codes = jnp.clip(jnp.round(levels), 0, 255).astype(jnp.uint8)
        scale, offset = step, low
    else:
        absmax = jnp.max(jnp.abs(blocks), axis=axes, keepdims=True)
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
        if scheme.code == "linear":
            codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8)
            scale = absmax / 127.0
        else:
            codes = _nearest_dynamic_level(normed)
            scale = absmax
        offset = None
    squeeze = lambda stat: None if stat is None else jnp.squeeze(stat, tuple(a % blocks.ndim for a in axes))
    return Quantized(_from_blocks(codes, x.shape[-1]), squeeze(scale), squeeze(offset))


def dequantize_blockwise(q: Quantized, scheme: Scheme) -> jax.Array:
    """The float32 array that `q` encodes (inverse of `quantize_blockwise` up to rounding)."""
    _check_input(q.codes, scheme)
    blocks = _to_blocks(q.codes, scheme)
    expand = lambda stat: jnp.expand_dims(stat, tuple(a % blocks.ndim for a in _block_axes(scheme)))
    if scheme.code == "dynamic":
        values = jnp.asarray(dynamic_tree_levels())[blocks] * expand(q.scale)
    elif scheme.code == "linear":
        values = blocks.astype(jnp.float32) * expand(q.scale)
    else:
        values = expand(q.offset) + blocks.astype(jnp.float32) * expand(q.scale)
    return _from_blocks(values, q.codes.shape[-1])

"""CAME (Luo et al., 2023) and SANA's CAME-8bit as Optax gradient transformations.

Per parameter, in float32, without bias correction (g the gradient):
  U = g^2 + eps1; factored: row/column EMAs (b2) of U and u = g * rsqrt((R / mean R) outer C);
  otherwise a full EMA v (b2) and u = g * rsqrt(v).
  u /= max(1, RMS(u) / clip_threshold);  m = b1 m + (1 - b1) u.
  Factored: Res = (u - m)^2 + eps2, row/column EMAs (b3) of Res, step = m * rsqrt((Rr / mean Rr) outer Cr);
  otherwise step = m.
`came` adds decoupled weight decay on the pre-update parameter and the learning rate: p -= lr (step + wd p).

With `eight_bit=True` the first moment m of factored parameters larger than `min_8bit_size` elements per
layer is stored in 8 bits (`quantize.Scheme`); the step uses this step's float32 m, so quantisation error
enters the next step only. Every other statistic stays float32.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sana_jax.optim import quantize
from sana_jax.optim.factoring import Factoring, FactoringRule, KeyPath, sana_factoring

# Dynamic-tree code with one absmax per row: measured in docs/optim.md.
DEFAULT_SCHEME = quantize.Scheme(code="dynamic", block_size=None)
SANA_MIN_8BIT_SIZE = 16384


class FactoredMoments(NamedTuple):
    """Row/column EMAs of g^2 (v_*) and of the instability (u - m)^2 (res_*) of a factored leaf.

    With factored axes (a, b): *_row drop axis b of the parameter, *_col drop axis a.
    """

    v_row: jax.Array
    v_col: jax.Array
    res_row: jax.Array
    res_col: jax.Array


class ScaleByCameState(NamedTuple):
    """State of `scale_by_came`; both fields have the params' tree structure above their leaves.

    mu: per leaf the first moment, float32 or `quantize.Quantized`.
    nu: per leaf `FactoredMoments` or the full float32 EMA of g^2.
    """

    mu: Any
    nu: Any


def _rsqrt_outer(row: jax.Array, col: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """rsqrt((row / mean(row over the row axis)) outer col), broadcast to the parameter's shape."""
    row_axis, col_axis = axes
    row_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=row_axis, keepdims=True))
    return jnp.expand_dims(row_factor, col_axis) * jnp.expand_dims(jax.lax.rsqrt(col), row_axis)


def _ema_of_means(row: jax.Array, col: jax.Array, x: jax.Array, decay: float,
                  axes: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    row_axis, col_axis = axes
    return (decay * row + (1 - decay) * jnp.mean(x, axis=col_axis),
            decay * col + (1 - decay) * jnp.mean(x, axis=row_axis))


def _block_view(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape that 8-bit blocks run along: size-1 axes (of 1x1 convs) dropped, at least 2-D."""
    squeezed = tuple(d for d in shape if d != 1)
    return (1,) * (2 - len(squeezed)) + squeezed


def quantize_first_moment(m: jax.Array, scheme: quantize.Scheme = DEFAULT_SCHEME) -> quantize.Quantized:
    """A leaf's first moment `m` (the parameter's shape) in 8 bits, as CAME-8bit stores it."""
    q = quantize.quantize_blockwise(m.astype(jnp.float32).reshape(_block_view(m.shape)), scheme)
    return q._replace(codes=q.codes.reshape(m.shape))


def dequantize_first_moment(q: quantize.Quantized, scheme: quantize.Scheme = DEFAULT_SCHEME) -> jax.Array:
    """The float32 first moment that `quantize_first_moment` stored."""
    shape = q.codes.shape
    return quantize.dequantize_blockwise(q._replace(codes=q.codes.reshape(_block_view(shape))), scheme).reshape(shape)


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    *,
    factoring: FactoringRule = sana_factoring,
    eight_bit: bool = False,
    scheme: quantize.Scheme = DEFAULT_SCHEME,
    min_8bit_size: int = SANA_MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """The CAME preconditioner: gradients -> steps (to be scaled by -learning_rate).

    Args:
      b1, b2, b3: EMA decays of the first moment, of g^2 and of the instability (u - m)^2.
      eps: (eps1 added to g^2, eps2 added to the instability).
      clip_threshold: the RMS of the preconditioned gradient u is clipped to this, per layer.
      factoring: rule (key path, shape) -> `Factoring`; `sana_factoring` (default) or
        `came_pytorch_factoring`.
      eight_bit: store m of factored leaves above `min_8bit_size` elements per layer in 8 bits.
      scheme: the 8-bit code and block layout; `quantize.SANA_SCHEME` is SANA's uint8 min-max.
      min_8bit_size: layers with at most this many elements keep a float32 m.

    Sharding: every state array keeps the axes of its parameter (statistics drop one matrix axis, 8-bit
    scales replace the last axis by its blocks; SANA's scheme also drops the row axis), so it shards
    along the same mesh axes. `init` run
    outside jit on sharded params returns a state sharded that way; under jit give `out_shardings`.
    `jax.eval_shape(init, params)` allocates nothing.
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value}: expected a decay in [0, 1]")
    if len(eps) != 2 or min(eps) < 0:
        raise ValueError(f"eps={eps}: expected two non-negative numbers (eps1, eps2)")
    if clip_threshold <= 0:
        raise ValueError(f"clip_threshold={clip_threshold}: expected a positive number")
    eps1, eps2 = eps

    def layout(path: KeyPath, x: jax.Array) -> tuple[Factoring, bool]:
        shape = tuple(x.shape)
        factored = factoring(path, shape)
        factored.check(shape, jax.tree_util.keystr(path) or "parameter")
        quantized = eight_bit and factored.axes is not None and factored.layer_size(shape) > min_8bit_size
        return factored, quantized

    def init_leaf(path, p):
        factored, quantized = layout(path, p)
        zeros = jnp.zeros_like(p, dtype=jnp.float32)
        mu = quantize_first_moment(zeros, scheme) if quantized else zeros
        if factored.axes is None:
            return mu, jnp.zeros_like(p, dtype=jnp.float32)
        # Reductions of the zeros (not fresh zeros) so that an eager init on sharded params shards the
        # statistics along the parameter's remaining axes.
        row_axis, col_axis = factored.axes
        row, col = jnp.sum(zeros, axis=col_axis), jnp.sum(zeros, axis=row_axis)
        return mu, FactoredMoments(row, col, jnp.zeros_like(row), jnp.zeros_like(col))

    def update_leaf(path, g, mu, nu):
        factored, quantized = layout(path, g)
        g = g.astype(jnp.float32)
        per_layer = tuple(range(factored.batch_ndim, g.ndim))
        if factored.axes is None:
            v = b2 * nu + (1 - b2) * (g * g + eps1)
            u = g * jax.lax.rsqrt(v)
        else:
            v_row, v_col = _ema_of_means(nu.v_row, nu.v_col, g * g + eps1, b2, factored.axes)
            u = g * _rsqrt_outer(v_row, v_col, factored.axes)
        rms = jnp.sqrt(jnp.mean(u * u, axis=per_layer, keepdims=True))
        u = u / jnp.maximum(1.0, rms / clip_threshold)
        m = b1 * (dequantize_first_moment(mu, scheme) if quantized else mu) + (1 - b1) * u
        new_mu = quantize_first_moment(m, scheme) if quantized else m
        if factored.axes is None:
            return m, new_mu, v
        res = (u - m) ** 2 + eps2
        res_row, res_col = _ema_of_means(nu.res_row, nu.res_col, res, b3, factored.axes)
        step = m * _rsqrt_outer(res_row, res_col, factored.axes)
        return step, new_mu, FactoredMoments(v_row, v_col, res_row, res_col)

    def init_fn(params):
        leaves = jax.tree_util.tree_map_with_path(init_leaf, params)
        pick = lambda i: jax.tree.map(lambda _, pair: pair[i], params, leaves)
        return ScaleByCameState(mu=pick(0), nu=pick(1))

    def update_fn(updates, state, params=None):
        del params
        results = jax.tree_util.tree_map_with_path(update_leaf, updates, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, triple: triple[i], updates, results)
        steps = jax.tree.map(lambda g, s: s.astype(g.dtype), updates, pick(0))
        return steps, ScaleByCameState(mu=pick(1), nu=pick(2))

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    eight_bit: bool = False,
    scheme: quantize.Scheme = DEFAULT_SCHEME,
    min_8bit_size: int = SANA_MIN_8BIT_SIZE,
    factoring: FactoringRule = sana_factoring,
) -> optax.GradientTransformation:
    """CAME (or CAME-8bit with `eight_bit=True`) with decoupled weight decay and a learning rate or schedule.

    `weight_decay` multiplies the pre-update parameter (p -= lr * wd * p), on the leaves selected by
    `weight_decay_mask` (an optax mask: pytree of bools or a callable of params; None = all leaves).
    The other arguments are those of `scale_by_came`. A fixed learning rate must be finite and positive.
    """
    if isinstance(learning_rate, numbers.Real) and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r}: expected a finite positive number or a schedule")
    preconditioner = scale_by_came(b1, b2, b3, eps, clip_threshold, factoring=factoring,
                                   eight_bit=eight_bit, scheme=scheme, min_8bit_size=min_8bit_size)
    decay = [optax.add_decayed_weights(weight_decay, weight_decay_mask)] if weight_decay else []
    return optax.chain(preconditioner, *decay, optax.scale_by_learning_rate(learning_rate))


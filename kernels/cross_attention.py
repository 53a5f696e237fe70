"""SANA's softmax cross-attention from image tokens to caption tokens, two ways, one differentiable entry point.

For q (B, N, H, d), k, v (B, L, H, d) and an additive bias (B, L) (the caption mask's), per batch entry and head:

  out_i = sum_j p_ij v_j,  p_i = softmax_j(q_i . k_j / sqrt(d) + bias_j).

- "native": the C++ kernels of `attention.cc` (CPU, float32, d a multiple of 16 up to 128), one item per batch
  entry and head, which read the rows where they lie (XLA transposes q, k and v into (B, H, ., d) copies and
  runs 64 small products per call on SANA's shapes). The backward recomputes p from the residuals q, k, v and
  bias. Through `partitioning.per_head`, so it works under vmap and keeps a batch- or head-sharded input sharded.
- "xla": jnp einsums and softmax, JAX autodiff; any backend and dtype, products accumulated in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.kernels import native_attention, partitioning

IMPLS = ("auto", "native", "xla")


def cross_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """The cross-attention in jnp (the module's formula), in v's dtype, logits and softmax in float32."""
    logits = jnp.einsum("bnhd,blhd->bhnl", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnl,blhd->bnhd", weights, v)


@functools.cache
def _native_halves(scale: float):
    """The kernels' (forward, backward) FFI calls for one scale, wrapped for vmap and sharding."""
    native_attention.require()
    result = native_attention.result

    def forward(q, k, v, bias):
        call = jax.ffi.ffi_call(native_attention.CROSS_FORWARD, result(q, q.shape, (0, 1, 2, 3)))
        return (call(q, k, v, bias, scale=np.float32(scale)),)

    def backward(q, k, v, bias, dout):
        results = (*(result(a, a.shape, (0, 1, 2, 3)) for a in (q, k, v)), result(bias, bias.shape, (0, 1, 2)))
        return tuple(jax.ffi.ffi_call(native_attention.CROSS_BACKWARD, results)(q, k, v, bias, dout,
                                                                                scale=np.float32(scale)))

    return (partitioning.per_head(forward, in_layouts=("bnhd", "blhd", "blhd", "bhl"), out_layouts=("bnhd",)),
            partitioning.per_head(backward, in_layouts=("bnhd", "blhd", "blhd", "bhl", "bnhd"),
                                  out_layouts=("bnhd", "blhd", "blhd", "bhl")))


def _per_head(q: jax.Array, bias: jax.Array) -> jax.Array:
    """bias (B, L) -> (B, H, L): a row per (batch entry, head), as the kernels take it."""
    return jnp.broadcast_to(bias[:, None, :], (bias.shape[0], q.shape[2], bias.shape[1]))


@jax.custom_vjp
def _native(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    return _native_halves(1.0 / math.sqrt(q.shape[-1]))[0](q, k, v, _per_head(q, bias))[0]


def _native_fwd(q, k, v, bias):
    return _native(q, k, v, bias), (q, k, v, bias)


def _native_bwd(residuals, dout):
    q, k, v, bias = residuals
    dq, dk, dv, d_bias = _native_halves(1.0 / math.sqrt(q.shape[-1]))[1](q, k, v, _per_head(q, bias), dout)
    return dq, dk, dv, jnp.sum(d_bias, axis=1)


_native.defvjp(_native_fwd, _native_bwd)


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Softmax attention from q's tokens to k's and v's, with an additive bias per key.

    Args:
      q: (B, N, H, d) queries; k, v: (B, L, H, d) keys and values, L >= 1; one dtype. bias: (B, L) float32.
      impl: "native" (the C++ kernels: CPU backend, float32, d a multiple of 16 up to 128), "xla", or "auto"
        (native where it can run, else XLA).
    Returns:
      (B, N, H, d) in v's dtype: out_i = sum_j p_ij v_j, p_i = softmax_j(q_i . k_j / sqrt(d) + bias_j).
    """
    if impl not in IMPLS:
        raise ValueError(f"cross_attention: impl={impl!r}: expected one of {IMPLS}")
    if (q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or (k.shape[0], *k.shape[2:]) != (q.shape[0], *q.shape[2:])
            or k.shape[1] < 1 or bias.shape != k.shape[:2]):
        raise ValueError(f"cross_attention: expected q (B, N, H, d), k and v (B, L, H, d) with L >= 1 and bias "
                         f"(B, L), got {q.shape}, {k.shape}, {v.shape}, {bias.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"cross_attention: expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if impl != "xla":
        reason = native_attention.unsupported(q)
        if reason is None:
            return _native(q, k, v, bias.astype(jnp.float32))
        if impl == "native":
            raise ValueError(f"cross_attention(impl='native'): {reason}")
    return cross_attention_xla(q, k, v, bias)

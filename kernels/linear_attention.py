"""SANA's ReLU linear attention: the XLA reference and the dispatching, differentiable entry point.

For q, k, v of shape (B, N, H, d), per batch entry and head, with q, k, v upcast to float32:

  o_i = sum_j v_j (relu(k_j) . relu(q_i)) / (sum_j relu(k_j) . relu(q_i) + eps).

`linear_attention` is a `jax.custom_vjp` whose forward returns the float32 state S = relu(K)^T V
(B, H, d, d) and key sum z = relu(K)^T 1 (B, H, d) next to the output, and whose backward is the
closed form of docs/kernels.md, so the residuals are q, k, v, S and z and no (N, d) float32 temporary
is kept. `impl` picks who runs the two halves: the C++ kernels of `attention.cc` (CPU, float32;
one item per batch entry and head, reading the rows where they lie, where XLA transposes them and runs
small batched products), the Triton kernels through jax_triton (GPU), or the same math in jnp. All go
through `partitioning.per_head`, so each works under vmap and keeps a batch- or head-sharded input
sharded.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.kernels import native_attention, partitioning

IMPLS = ("auto", "native", "triton", "xla")

_logger = logging.getLogger(__name__)


def _state(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """S = relu(K)^T V (B, H, d, d) and z = relu(K)^T 1 (B, H, d), float32."""
    k = jax.nn.relu(k.astype(jnp.float32))
    return jnp.einsum("bnhd,bnhe->bhde", k, v.astype(jnp.float32)), jnp.sum(k, axis=1)


def _apply(q: jax.Array, state: jax.Array, key_sum: jax.Array, eps: float) -> jax.Array:
    """relu(q) S / (relu(q) . z + eps), float32 (B, N, H, d)."""
    q = jax.nn.relu(q.astype(jnp.float32))
    numerator = jnp.einsum("bnhd,bhde->bnhe", q, state)
    denominator = jnp.einsum("bnhd,bhd->bnh", q, key_sum)[..., None]
    return numerator / (denominator + eps)


def linear_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-15) -> jax.Array:
    """ReLU linear attention in plain jnp, accumulated in float32.

    Args:
      q, k, v: (B, N, H, d) queries, keys and values (any float dtype).
      eps: added to the normaliser.
    Returns:
      (B, N, H, d) in q's dtype: o_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps), with q, k ReLU'd.
    """
    return _apply(q, *_state(k, v), eps).astype(q.dtype)


def _forward_xla(q, k, v, eps):
    state, key_sum = _state(k, v)
    return _apply(q, state, key_sum, eps).astype(q.dtype), state, key_sum


def _backward_xla(q, k, v, state, key_sum, dout, eps):
    """dq, dk, dv of `_forward_xla` given dout; the closed form of docs/kernels.md."""
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    q_relu = jax.nn.relu(q32)
    denominator = jnp.einsum("bnhd,bhd->bnh", q_relu, key_sum)[..., None] + eps
    out = jnp.einsum("bnhd,bhde->bnhe", q_relu, state) / denominator
    dout = dout.astype(jnp.float32)
    d_numerator = dout / denominator
    d_denominator = -jnp.sum(dout * out, axis=-1, keepdims=True) / denominator
    dq = jnp.einsum("bnhe,bhde->bnhd", d_numerator, state) + d_denominator * key_sum[:, None]
    d_state = jnp.einsum("bnhd,bnhe->bhde", q_relu, d_numerator)
    d_key_sum = jnp.einsum("bnhd,bnh->bhd", q_relu, d_denominator[..., 0])
    dk = jnp.einsum("bnhe,bhde->bnhd", v.astype(jnp.float32), d_state) + d_key_sum[:, None]
    dv = jnp.einsum("bnhd,bhde->bnhe", jax.nn.relu(k32), d_state)
    return (jnp.where(q32 > 0, dq, 0).astype(q.dtype), jnp.where(k32 > 0, dk, 0).astype(k.dtype),
            dv.astype(v.dtype))


def _forward_native(q, k, v, eps):
    batch, _, heads, d = q.shape
    results = (native_attention.result(q, q.shape, (0, 1, 2, 3)),
               native_attention.result(q, (batch, heads, d, d), (0, 2, None, None)),
               native_attention.result(q, (batch, heads, d), (0, 2, None)))
    return jax.ffi.ffi_call(native_attention.LINEAR_FORWARD, results)(q, k, v, eps=np.float32(eps))


def _backward_native(q, k, v, state, key_sum, dout, eps):
    results = tuple(native_attention.result(a, a.shape, (0, 1, 2, 3)) for a in (q, k, v))
    return jax.ffi.ffi_call(native_attention.LINEAR_BACKWARD, results)(q, k, v, state, key_sum, dout,
                                                                       eps=np.float32(eps))


@functools.cache
def _halves(impl: str, eps: float):
    """(forward, backward) of `impl` for one eps, wrapped for vmap and sharding."""
    if impl == "triton":
        from sana_jax.kernels import triton_linear_attention as kernels

        run_forward, run_backward = kernels.forward, kernels.backward
    elif impl == "native":
        native_attention.require()
        run_forward, run_backward = _forward_native, _backward_native
    else:
        run_forward, run_backward = _forward_xla, _backward_xla
    forward = partitioning.per_head(
        lambda q, k, v: tuple(run_forward(q, k, v, eps)),
        in_layouts=("bnhd", "bmhd", "bmhe"), out_layouts=("bnhe", "bhde", "bhd"))
    backward = partitioning.per_head(
        lambda q, k, v, state, key_sum, dout: tuple(run_backward(q, k, v, state, key_sum, dout, eps)),
        in_layouts=("bnhd", "bmhd", "bmhe", "bhde", "bhd", "bnhe"),
        out_layouts=("bnhd", "bmhd", "bmhe"))
    return forward, backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear_attention(q, k, v, eps, impl):
    return _halves(impl, eps)[0](q, k, v)[0]


def _linear_attention_fwd(q, k, v, eps, impl):
    out, state, key_sum = _halves(impl, eps)[0](q, k, v)
    return out, (q, k, v, state, key_sum)


def _linear_attention_bwd(eps, impl, residuals, dout):
    return _halves(impl, eps)[1](*residuals, dout)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def triton_unsupported(q: jax.Array) -> str | None:
    """Why the Triton kernels cannot run on q (B, N, H, d) here, or None when they can."""
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not 'gpu'"
    try:
        from sana_jax.kernels import triton_linear_attention as kernels
    except ImportError as e:
        return f"triton does not import ({e})"

    if q.shape[-1] not in kernels.HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {kernels.HEAD_DIMS}"
    if q.dtype not in kernels.DTYPES:
        return f"dtype {q.dtype} is not one of {[d.name for d in kernels.DTYPES]}"
    try:
        kernels.import_jax_triton()
    except ImportError as e:
        return f"jax_triton does not import ({e})"
    return None


def _resolve(impl: str, q: jax.Array) -> str:
    if impl == "xla":
        return impl
    if impl == "triton":
        reason = triton_unsupported(q)
        if reason is not None:
            raise ValueError(f"linear_attention(impl='triton'): {reason}")
        _logger.debug("linear_attention(impl='triton'): Triton kernels for %s %s", q.shape, q.dtype)
        return impl
    reason = native_attention.unsupported(q)
    if reason is None:
        _logger.debug("linear_attention(impl=%r): C++ kernels for %s %s", impl, q.shape, q.dtype)
        return "native"
    if impl == "native":
        raise ValueError(f"linear_attention(impl='native'): {reason}")
    _logger.debug("linear_attention(impl='auto'): XLA, since %s", reason)
    return "xla"


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-15,
                     impl: str = "auto") -> jax.Array:
    """ReLU linear attention with a closed-form backward; the math of `linear_attention_xla`.

    Args:
      q, k, v: (B, N, H, d) queries, keys and values, one shape and dtype (float32 or bfloat16 for
        the Triton kernels, float32 for the native ones).
      eps: added to the normaliser.
      impl: "native" (the C++ kernels: CPU backend, float32, d a multiple of 16 up to 128), "triton"
        (the Triton kernels through jax_triton: GPU backend, d in (32, 64, 128); only when asked for),
        "xla" (jnp), or "auto" (native where it can run, else XLA).
    Returns:
      (B, N, H, d) in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    shapes = {"q": q.shape, "k": k.shape, "v": v.shape}
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one (B, N, H, d) shape, got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return _linear_attention(q, k, v, float(eps), _resolve(impl, q))

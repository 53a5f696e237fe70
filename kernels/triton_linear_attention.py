"""Triton kernels for ReLU linear attention on (B, N, H, d) arrays, and their JAX launchers.

Per (batch, head) the forward accumulates, over token tiles and in float32, the (d x d) state
S = relu(K)^T V and the key sum z = relu(K)^T 1, then writes out = relu(Q) S / (relu(Q) z + eps).
The backward needs only q, k, v, S and z (see docs/kernels.md for the derivation):

  num = relu(q) S,  den = relu(q) . z + eps,  o = num / den,
  dnum = g / den,   dden = -(g . o) / den,
  dq = [q > 0] (dnum S^T + dden z),   dS = relu(Q)^T dnum,   dz = relu(Q)^T dden,
  dk = [k > 0] (v dS^T + dz),         dv = relu(K) dS.

Each direction is two sweeps over the tokens: (state, output) forward and (query grads, key grads)
backward. With `splits == 1` one program per (batch, head) runs both sweeps and keeps the state in
registers; with `splits > 1` each sweep is its own kernel over (batch * heads, splits) programs, each
owning a token range, and the partial states are summed in between (for small batch * heads).

Arrays are row-major (B, N, H, d), so a token row of one head is d contiguous elements and rows are
H * d apart; no transposes are needed around the calls. Inputs may be float32 or bfloat16; they
are upcast to float32, every sum is float32, and `input_precision` says how tl.dot rounds its
operands. This module imports triton, and imports jax_triton only when a kernel is called.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# ----------------------------------------------------------------------------- sweeps


@triton.jit
def _head_offset(batch_head, tokens, heads, D: tl.constexpr):
    """Element offset of token 0 of one (batch, head) in a (B, N, H, D) array."""
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    return batch * tokens * heads * D + head * D


@triton.jit
def _state_sweep(k_ptr, v_ptr, start, stop, row_stride, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Returns S = relu(K)^T V (D, D) and z = sum relu(K) (D,) over tokens [start, stop)."""
    state = tl.zeros((D, D), dtype=tl.float32)
    key_sum = tl.zeros((D,), dtype=tl.float32)
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        offsets = rows[:, None] * row_stride + tl.arange(0, D)[None, :]
        mask = rows[:, None] < stop
        k = tl.maximum(tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        state = tl.dot(tl.trans(k), v, state, input_precision=PRECISION)
        key_sum += tl.sum(k, axis=0)
    return state, key_sum


@triton.jit
def _output_sweep(q_ptr, out_ptr, state, key_sum, eps, start, stop, row_stride, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Writes out = relu(Q) S / (relu(Q) z + eps) for tokens [start, stop)."""
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        offsets = rows[:, None] * row_stride + tl.arange(0, D)[None, :]
        mask = rows[:, None] < stop
        q = tl.maximum(tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
        numerator = tl.dot(q, state, input_precision=PRECISION)
        denominator = tl.sum(q * key_sum[None, :], axis=1) + eps
        out = numerator / denominator[:, None]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _query_grad_sweep(q_ptr, dout_ptr, dq_ptr, state, key_sum, eps, start, stop, row_stride,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Writes dq for tokens [start, stop); returns their dS = relu(Q)^T dnum and dz = relu(Q)^T dden."""
    d_state = tl.zeros((D, D), dtype=tl.float32)
    d_key_sum = tl.zeros((D,), dtype=tl.float32)
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        offsets = rows[:, None] * row_stride + tl.arange(0, D)[None, :]
        mask = rows[:, None] < stop
        q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        q_relu = tl.maximum(q, 0.0)
        denominator = tl.sum(q_relu * key_sum[None, :], axis=1) + eps
        out = tl.dot(q_relu, state, input_precision=PRECISION) / denominator[:, None]
        d_numerator = dout / denominator[:, None]
        d_denominator = -tl.sum(dout * out, axis=1) / denominator
        dq = tl.dot(d_numerator, tl.trans(state), input_precision=PRECISION)
        dq += d_denominator[:, None] * key_sum[None, :]
        dq = tl.where(q > 0.0, dq, 0.0)
        tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        d_state = tl.dot(tl.trans(q_relu), d_numerator, d_state, input_precision=PRECISION)
        d_key_sum += tl.sum(q_relu * d_denominator[:, None], axis=0)
    return d_state, d_key_sum


@triton.jit
def _key_grad_sweep(k_ptr, v_ptr, dk_ptr, dv_ptr, d_state, d_key_sum, start, stop, row_stride,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Writes dk = [k > 0] (V dS^T + dz) and dv = relu(K) dS for tokens [start, stop)."""
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        offsets = rows[:, None] * row_stride + tl.arange(0, D)[None, :]
        mask = rows[:, None] < stop
        k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dk = tl.dot(v, tl.trans(d_state), input_precision=PRECISION) + d_key_sum[None, :]
        dk = tl.where(k > 0.0, dk, 0.0)
        dv = tl.dot(tl.maximum(k, 0.0), d_state, input_precision=PRECISION)
        tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_state(state_ptr, key_sum_ptr, index, state, key_sum, D: tl.constexpr):
    """Stores state (D, D) and key_sum (D,) as entry `index` of (..., D, D) and (..., D) arrays."""
    index = index.to(tl.int64)
    cols = tl.arange(0, D)
    tl.store(state_ptr + index * D * D + cols[:, None] * D + cols[None, :], state)
    tl.store(key_sum_ptr + index * D + cols, key_sum)


@triton.jit
def _load_state(state_ptr, key_sum_ptr, index, D: tl.constexpr):
    """Loads entry `index` of (..., D, D) and (..., D) float32 arrays."""
    index = index.to(tl.int64)
    cols = tl.arange(0, D)
    state = tl.load(state_ptr + index * D * D + cols[:, None] * D + cols[None, :])
    return state, tl.load(key_sum_ptr + index * D + cols)


@triton.jit
def _split_range(tokens, split_tokens):
    """Token range [start, stop) of this program's split (grid axis 1)."""
    start = tl.program_id(1) * split_tokens
    return start, tl.minimum(start + split_tokens, tokens)


# ----------------------------------------------------------------------------- kernels
# Argument order follows jax_triton.triton_call: inputs and scalars, then outputs, then constexprs.


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, tokens, heads, eps, out_ptr, state_ptr, key_sum_ptr,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (batch, head): out (B, N, H, D), state (B, H, D, D), key_sum (B, H, D)."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    state, key_sum = _state_sweep(k_ptr + base, v_ptr + base, 0, tokens, heads * D, D, BLOCK_N,
                                  PRECISION)
    _output_sweep(q_ptr + base, out_ptr + base, state, key_sum, eps, 0, tokens, heads * D, D, BLOCK_N,
                  PRECISION)
    _store_state(state_ptr, key_sum_ptr, batch_head, state, key_sum, D)


@triton.jit
def _partial_state_kernel(k_ptr, v_ptr, tokens, heads, split_tokens, state_ptr, key_sum_ptr,
                          D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (batch * head, split): state (B, H, splits, D, D), key_sum (B, H, splits, D)."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    start, stop = _split_range(tokens, split_tokens)
    state, key_sum = _state_sweep(k_ptr + base, v_ptr + base, start, stop, heads * D, D, BLOCK_N,
                                  PRECISION)
    _store_state(state_ptr, key_sum_ptr, batch_head * tl.num_programs(1) + tl.program_id(1), state,
                 key_sum, D)


@triton.jit
def _output_kernel(q_ptr, state_ptr, key_sum_ptr, tokens, heads, eps, split_tokens, out_ptr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (batch * head, split): out (B, N, H, D) from state (B, H, D, D), key_sum (B, H, D)."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    start, stop = _split_range(tokens, split_tokens)
    state, key_sum = _load_state(state_ptr, key_sum_ptr, batch_head, D)
    _output_sweep(q_ptr + base, out_ptr + base, state, key_sum, eps, start, stop, heads * D, D, BLOCK_N,
                  PRECISION)


@triton.jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, state_ptr, key_sum_ptr, dout_ptr, tokens, heads, eps,
                     dq_ptr, dk_ptr, dv_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program per (batch, head): dq, dk, dv (B, N, H, D)."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    state, key_sum = _load_state(state_ptr, key_sum_ptr, batch_head, D)
    d_state, d_key_sum = _query_grad_sweep(q_ptr + base, dout_ptr + base, dq_ptr + base, state, key_sum,
                                           eps, 0, tokens, heads * D, D, BLOCK_N, PRECISION)
    _key_grad_sweep(k_ptr + base, v_ptr + base, dk_ptr + base, dv_ptr + base, d_state, d_key_sum, 0,
                    tokens, heads * D, D, BLOCK_N, PRECISION)


@triton.jit
def _query_grad_kernel(q_ptr, state_ptr, key_sum_ptr, dout_ptr, tokens, heads, eps, split_tokens,
                       dq_ptr, d_state_ptr, d_key_sum_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Program (batch * head, split): dq (B, N, H, D) and partial dS, dz (B, H, splits, D[, D])."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    start, stop = _split_range(tokens, split_tokens)
    state, key_sum = _load_state(state_ptr, key_sum_ptr, batch_head, D)
    d_state, d_key_sum = _query_grad_sweep(q_ptr + base, dout_ptr + base, dq_ptr + base, state, key_sum,
                                           eps, start, stop, heads * D, D, BLOCK_N, PRECISION)
    _store_state(d_state_ptr, d_key_sum_ptr, batch_head * tl.num_programs(1) + tl.program_id(1),
                 d_state, d_key_sum, D)


@triton.jit
def _key_grad_kernel(k_ptr, v_ptr, d_state_ptr, d_key_sum_ptr, tokens, heads, split_tokens, dk_ptr,
                     dv_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (batch * head, split): dk, dv (B, N, H, D) from dS (B, H, D, D), dz (B, H, D)."""
    batch_head = tl.program_id(0)
    base = _head_offset(batch_head, tokens, heads, D)
    start, stop = _split_range(tokens, split_tokens)
    d_state, d_key_sum = _load_state(d_state_ptr, d_key_sum_ptr, batch_head, D)
    _key_grad_sweep(k_ptr + base, v_ptr + base, dk_ptr + base, dv_ptr + base, d_state, d_key_sum, start,
                    stop, heads * D, D, BLOCK_N, PRECISION)


# ----------------------------------------------------------------------------- launch configs


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched.

    block_n: tokens per tile (a power of two >= 16, the smallest tl.dot extent).
    splits: token ranges per (batch, head); 1 runs both sweeps in one program per (batch, head).
    num_warps, num_stages: Triton's launch and software-pipelining parameters.
    precision: tl.dot input precision for the float32 products ("ieee", "tf32x3" or "tf32").
    """

    block_n: int
    splits: int
    num_warps: int
    num_stages: int
    precision: str

    def split(self, tokens: int) -> tuple[int, int]:
        """(tokens per split, a whole number of tiles; number of splits, <= `splits`) covering `tokens`."""
        split_tokens = max(1, math.ceil(math.ceil(tokens / self.splits) / self.block_n)) * self.block_n
        return split_tokens, max(1, math.ceil(tokens / split_tokens))

    def meta(self, head_dim: int) -> dict:
        """jax_triton.triton_call's launch keywords: warps, stages and the kernels' constexprs."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, D=head_dim, BLOCK_N=self.block_n,
                    PRECISION=self.precision)


# Tile shape per head dim: (block_n, num_warps, num_stages). The (D, D) float32 state lives in
# registers, so wider heads take shorter tiles and more warps.
TILE_TABLE = {32: (64, 4, 2), 64: (64, 4, 2), 128: (32, 8, 2)}
HEAD_DIMS = tuple(TILE_TABLE)
# Below this many (batch, head) programs the token axis is split for parallelism: two programs per
# streaming multiprocessor of a 132-SM H100 / H200.
TARGET_PROGRAMS = 264
# A split walks at least this many tiles, so the partial-state round trip stays small.
MIN_TILES_PER_SPLIT = 4


def _require_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim}: the Triton kernels support {HEAD_DIMS}")


def input_precision(dtype: jnp.dtype, head_dim: int) -> str:
    """tl.dot's input precision for the products of `dtype` (B, N, H, `head_dim`) inputs.

    bfloat16: "tf32". A bfloat16 value (8 significant bits) is exact in TF32 (11), so only operands
    computed in float32 (the state, and the backward's dout / den) are rounded, to 2^-11 relative:
    four times finer than the rounding of the bfloat16 result.
    float32: "tf32x3" (three TF32 products, about float32 accuracy), except at d = 128, where its split
    operands need at least 288 KiB of shared memory in the backward (Hopper has 227 KiB per program):
    "ieee" there.
    """
    if jnp.dtype(dtype) == jnp.bfloat16:
        return "tf32"
    return "ieee" if head_dim == 128 else "tf32x3"


def launch_config(batch_heads: int, tokens: int, head_dim: int, dtype: jnp.dtype) -> LaunchConfig:
    """The table's launch config for B * H = `batch_heads` heads of `tokens` tokens of `dtype`."""
    _require_head_dim(head_dim)
    block_n, num_warps, num_stages = TILE_TABLE[head_dim]
    splits = 1
    if batch_heads < TARGET_PROGRAMS:
        splits = max(1, min(math.ceil(TARGET_PROGRAMS / batch_heads),
                            tokens // (MIN_TILES_PER_SPLIT * block_n)))
    return LaunchConfig(block_n=block_n, splits=splits, num_warps=num_warps, num_stages=num_stages,
                        precision=input_precision(dtype, head_dim))


# ----------------------------------------------------------------------------- JAX launchers


def import_jax_triton():
    """Imports jax_triton (it needs a GPU build of jax), keeping TRITON_CACHE_DIR, which its import clears."""
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    finally:
        if cache_dir is not None:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    return jax_triton


def _check(arrays: dict[str, jax.Array]) -> tuple[int, int, int, int]:
    """(B, N, H, d) of same-shape, same-dtype arrays the kernels support; raises ValueError otherwise."""
    shapes = {name: x.shape for name, x in arrays.items()}
    q = arrays["q"]
    if q.ndim != 4 or any(shape != q.shape for shape in shapes.values()):
        raise ValueError(f"expected (B, N, H, d) arrays of one shape, got {shapes}")
    dtypes = {name: x.dtype for name, x in arrays.items()}
    if q.dtype not in DTYPES or any(dtype != q.dtype for dtype in dtypes.values()):
        raise ValueError(f"expected one dtype among {[d.name for d in DTYPES]}, got {dtypes}")
    batch, tokens, heads, head_dim = q.shape
    _require_head_dim(head_dim)
    if tokens * heads * head_dim >= 2**31:
        raise ValueError(f"N * H * d = {tokens * heads * head_dim} elements per batch entry overflow "
                         "the kernels' int32 row offsets")
    return batch, tokens, heads, head_dim


def _state_shapes(batch: int, heads: int, head_dim: int, *splits: int):
    """Float32 (B, H, [splits,] d, d) states and (B, H, [splits,] d) key sums."""
    return (jax.ShapeDtypeStruct((batch, heads, *splits, head_dim, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, *splits, head_dim), jnp.float32))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, eps: float,
            config: LaunchConfig | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Linear attention forward on (B, N, H, d) inputs through jax_triton.

    Returns:
      out (B, N, H, d) in the input dtype, state S (B, H, d, d) and key sum z (B, H, d) in float32.
    """
    batch, tokens, heads, head_dim = _check({"q": q, "k": k, "v": v})
    config = config or launch_config(batch * heads, tokens, head_dim, q.dtype)
    triton_call = import_jax_triton().triton_call
    eps = np.float32(eps)
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    meta = config.meta(head_dim)
    if config.splits == 1:
        return tuple(triton_call(
            q, k, v, tokens, heads, eps, kernel=_forward_kernel, grid=(batch * heads,),
            out_shape=(out_shape, *_state_shapes(batch, heads, head_dim)), name="linear_attention_fwd",
            **meta))
    split_tokens, splits = config.split(tokens)
    grid = (batch * heads, splits)
    state, key_sum = triton_call(
        k, v, tokens, heads, split_tokens, kernel=_partial_state_kernel, grid=grid,
        out_shape=_state_shapes(batch, heads, head_dim, grid[1]), name="linear_attention_state", **meta)
    state, key_sum = state.sum(axis=2), key_sum.sum(axis=2)
    out = triton_call(q, state, key_sum, tokens, heads, eps, split_tokens, kernel=_output_kernel,
                      grid=grid, out_shape=out_shape, name="linear_attention_out", **meta)
    return out, state, key_sum


def backward(q: jax.Array, k: jax.Array, v: jax.Array, state: jax.Array, key_sum: jax.Array,
             dout: jax.Array, eps: float,
             config: LaunchConfig | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) (B, N, H, d), in the input dtype, of the forward given dout = d loss / d out.

    state (B, H, d, d) and key_sum (B, H, d) are the float32 residuals `forward` returned.
    """
    batch, tokens, heads, head_dim = _check({"q": q, "k": k, "v": v, "dout": dout})
    config = config or launch_config(batch * heads, tokens, head_dim, q.dtype)
    triton_call = import_jax_triton().triton_call
    eps = np.float32(eps)
    grad_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    meta = config.meta(head_dim)
    if config.splits == 1:
        return tuple(triton_call(
            q, k, v, state, key_sum, dout, tokens, heads, eps, kernel=_backward_kernel,
            grid=(batch * heads,), out_shape=(grad_shape,) * 3, name="linear_attention_bwd", **meta))
    split_tokens, splits = config.split(tokens)
    grid = (batch * heads, splits)
    dq, d_state, d_key_sum = triton_call(
        q, state, key_sum, dout, tokens, heads, eps, split_tokens, kernel=_query_grad_kernel, grid=grid,
        out_shape=(grad_shape, *_state_shapes(batch, heads, head_dim, grid[1])),
        name="linear_attention_bwd_query", **meta)
    dk, dv = triton_call(
        k, v, d_state.sum(axis=2), d_key_sum.sum(axis=2), tokens, heads, split_tokens,
        kernel=_key_grad_kernel, grid=grid, out_shape=(grad_shape,) * 2, name="linear_attention_bwd_key",
        **meta)
    return dq, dk, dv

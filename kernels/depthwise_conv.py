"""SANA's 3x3 depthwise convolution (zero padding 1, channels-last), three ways, one differentiable entry point.

- "native": the C++ kernels of `depthwise_conv.cc` as XLA FFI calls (CPU, float32). The backward reads the
  input and the output gradient once for all nine taps; XLA has no such kernel on CPU and writes out a shifted
  copy of the input per tap. Built on first use (`native.library`); through `partitioning.per_head` (channels
  in the role of heads), so it works under vmap and keeps a batch- or channel-sharded input sharded.
- "shifted": nine shifted multiply-adds in jnp with a hand-written gradient (any backend and dtype). On CPU
  about 10x faster forward and 4x forward+backward than XLA's grouped convolution.
- "grouped": `lax.conv_general_dilated` with one group per channel, which cuDNN runs well on GPUs.

`gated_depthwise_conv3x3` is the convolution as SANA's Mix-FFN runs it, between a SiLU and a gated linear unit;
its native form is one kernel each way, which reads the input once and writes out neither the SiLU's output nor
the convolution's.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from sana_jax.kernels import native, partitioning

IMPLS = ("auto", "native", "shifted", "grouped")
_FORWARD_TARGET = "sana_depthwise_conv3x3"
_BACKWARD_TARGET = "sana_depthwise_conv3x3_backward"
_GATED_FORWARD_TARGET = "sana_gated_depthwise_conv3x3"
_GATED_BACKWARD_TARGET = "sana_gated_depthwise_conv3x3_backward"

_logger = logging.getLogger(__name__)


def _pad1(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _shifted_sum(padded: jax.Array, kernel: jax.Array, height: int, width: int) -> jax.Array:
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[:, i:i + height, j:j + width, :] * kernel[i, j]
            out = term if out is None else out + term
    return out


@jax.custom_vjp
def _shifted(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _shifted_sum(_pad1(x), kernel, x.shape[1], x.shape[2]) + bias


def _shifted_fwd(x, kernel, bias):
    return _shifted(x, kernel, bias), (x, kernel)


def _shifted_bwd(residuals, grad):
    x, kernel = residuals
    batch, height, width, channels = x.shape
    # d x: the same stencil with the kernel flipped, over the padded output gradient.
    dx = _shifted_sum(_pad1(grad), kernel[::-1, ::-1], height, width)
    # d kernel: one reduction per tap, in a loop (XLA fuses nine sibling reductions into a slow kernel).
    padded = _pad1(x)

    def tap_gradient(tap):
        view = jax.lax.dynamic_slice(padded, (0, tap // 3, tap % 3, 0), (batch, height, width, channels))
        return jnp.sum((view * grad).reshape(-1, channels), axis=0)

    dkernel = jax.lax.map(tap_gradient, jnp.arange(9)).reshape(3, 3, channels)
    dbias = jnp.sum(grad.reshape(-1, channels), axis=0)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def _grouped(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    out = jax.lax.conv_general_dilated(
        x, kernel[:, :, None, :], window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    return out + bias


def _native_build_failure() -> str | None:
    """Why the native kernels' library cannot be had here (built, loaded and registered), or None."""
    return native.registration_failure("depthwise_conv", (
        (_FORWARD_TARGET, "SanaDepthwiseConv3x3"), (_BACKWARD_TARGET, "SanaDepthwiseConv3x3Backward"),
        (_GATED_FORWARD_TARGET, "SanaGatedDepthwiseConv3x3"),
        (_GATED_BACKWARD_TARGET, "SanaGatedDepthwiseConv3x3Backward")))


def native_unsupported(x: jax.Array) -> str | None:
    """Why the native kernels cannot run on x (B, H, W, C) here, or None when they can."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not 'cpu'"
    if x.dtype != jnp.float32:
        return f"dtype {x.dtype} is not float32"
    return _native_build_failure()


def _like(a: jax.Array) -> jax.ShapeDtypeStruct:
    """An FFI result's type: a's shape, dtype and sharding (under Explicit mesh axes a result's type names its mesh
    axes). For a result shaped like part of an input, pass that part (a slice, which XLA then drops)."""
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.typeof(a).sharding)


@functools.cache
def _native_halves():
    """(forward, backward) FFI calls over per-image kernels and biases, wrapped for vmap and sharding."""
    def forward(x, kernels, biases):
        return (jax.ffi.ffi_call(_FORWARD_TARGET, _like(x))(x, kernels, biases),)

    def backward(x, kernels, dy):
        results = (_like(x), _like(kernels), _like(kernels[:, 0, 0]))
        return tuple(jax.ffi.ffi_call(_BACKWARD_TARGET, results)(x, kernels, dy))

    return (partitioning.per_head(forward, in_layouts=("bijh", "bpqh", "bh"), out_layouts=("bijh",)),
            partitioning.per_head(backward, in_layouts=("bijh", "bpqh", "bijh"),
                                  out_layouts=("bijh", "bpqh", "bh")))


def _per_image(x: jax.Array, a: jax.Array) -> jax.Array:
    return jnp.broadcast_to(a, (x.shape[0], *a.shape))


@jax.custom_vjp
def _native(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _native_halves()[0](x, _per_image(x, kernel), _per_image(x, bias))[0]


def _native_fwd(x, kernel, bias):
    return _native(x, kernel, bias), (x, kernel)


def _native_bwd(residuals, dy):
    x, kernel = residuals
    dx, dkernels, dbiases = _native_halves()[1](x, _per_image(x, kernel), dy)
    return dx, jnp.sum(dkernels, axis=0), jnp.sum(dbiases, axis=0)


_native.defvjp(_native_fwd, _native_bwd)


@functools.cache
def _native_gated_halves():
    """The gated kernels' (forward, backward) FFI calls, as `_native_halves`; channels as (2, C)."""
    def forward(u, shifts, kernels, biases):
        return (jax.ffi.ffi_call(_GATED_FORWARD_TARGET, _like(u[:, :, :, 0]))(u, shifts, kernels, biases),)

    def backward(u, shifts, kernels, biases, dout):
        results = (_like(u), _like(shifts), _like(kernels), _like(biases))
        return tuple(jax.ffi.ffi_call(_GATED_BACKWARD_TARGET, results)(u, shifts, kernels, biases, dout))

    return (partitioning.per_head(forward, in_layouts=("bijgh", "bgh", "bpqgh", "bgh"), out_layouts=("bijh",)),
            partitioning.per_head(backward, in_layouts=("bijgh", "bgh", "bpqgh", "bgh", "bijh"),
                                  out_layouts=("bijgh", "bgh", "bpqgh", "bgh")))


def _halves(a: jax.Array) -> jax.Array:
    """(..., 2C) -> (..., 2, C): the gated linear unit's values and gates."""
    return a.reshape(*a.shape[:-1], 2, a.shape[-1] // 2)


def _gated_operands(u, shift, kernel, bias):
    return _halves(u), *(_per_image(u, _halves(a)) for a in (shift, kernel, bias))


@jax.custom_vjp
def _native_gated(u: jax.Array, shift: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _native_gated_halves()[0](*_gated_operands(u, shift, kernel, bias))[0]


def _native_gated_fwd(u, shift, kernel, bias):
    return _native_gated(u, shift, kernel, bias), (u, shift, kernel, bias)


def _native_gated_bwd(residuals, dout):
    u, shift, kernel, bias = residuals
    du, *per_image = _native_gated_halves()[1](*_gated_operands(*residuals), dout)
    dshift, dkernel, dbias = (jnp.sum(g, axis=0).reshape(a.shape)
                              for g, a in zip(per_image, (shift, kernel, bias), strict=True))
    return du.reshape(u.shape), dshift, dkernel, dbias


_native_gated.defvjp(_native_gated_fwd, _native_gated_bwd)


@functools.cache
def _warn_fallback(reason: str) -> None:
    _logger.warning("depthwise_conv3x3: the native CPU kernels are unavailable (%s); using the slower "
                    "shifted form", reason)


def _resolve(name: str, impl: str, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> str:
    """The implementation `name` runs for these arguments: "native", "shifted" or "grouped"; ValueError (one line)
    for bad arguments."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl={impl!r}: expected one of {IMPLS}")
    if x.ndim != 4 or kernel.shape != (3, 3, x.shape[-1]) or bias.shape != (x.shape[-1],):
        raise ValueError(f"{name}: expected x (B, H, W, C), kernel (3, 3, C) and bias (C,), got {x.shape}, "
                         f"{kernel.shape}, {bias.shape}")
    if not (x.dtype == kernel.dtype == bias.dtype):
        raise ValueError(f"{name}: expected x, kernel and bias of one dtype, got {x.dtype}, {kernel.dtype}, "
                         f"{bias.dtype}")
    if impl in ("shifted", "grouped"):
        return impl
    reason = native_unsupported(x)
    if reason is None:
        return "native"
    if impl == "native":
        raise ValueError(f"{name}(impl='native'): {reason}")
    if jax.default_backend() != "cpu":
        return "grouped"
    if x.dtype == jnp.float32:
        _warn_fallback(reason)
    return "shifted"


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, impl: str = "auto") -> jax.Array:
    """3x3 depthwise convolution with zero padding 1 and a bias.

    Args:
      x: (B, H, W, C) images, channels last; kernel: (3, 3, C); bias: (C,); one dtype.
      impl: "native" (the C++ kernels: CPU, float32), "shifted", "grouped" (see the module's docstring),
        or "auto": native where it can run, else shifted on CPU and grouped on other backends.
    Returns:
      (B, H, W, C): out[b, i, j, c] = bias[c] + sum_{di, dj} x[b, i + di - 1, j + dj - 1, c] kernel[di, dj, c].
    """
    resolved = _resolve("depthwise_conv3x3", impl, x, kernel, bias)
    return {"native": _native, "shifted": _shifted, "grouped": _grouped}[resolved](x, kernel, bias)


def gated_depthwise_conv3x3(u: jax.Array, shift: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                            impl: str = "auto") -> jax.Array:
    """SANA's Mix-FFN between its two 1x1 convolutions: SiLU, the 3x3 depthwise convolution, the gated linear unit.

    Args:
      u: (B, H, W, 2C), the first 1x1 convolution's product; shift: (2C,), its bias; kernel: (3, 3, 2C);
        bias: (2C,); one dtype.
      impl: as `depthwise_conv3x3`'s; "native" runs all three steps in one C++ kernel each way, the bias add too.
    Returns:
      (B, H, W, C): a * silu(g), where (a, g) = the channel halves of depthwise_conv3x3(silu(u + shift), kernel,
      bias).
    """
    resolved = _resolve("gated_depthwise_conv3x3", impl, u, kernel, bias)
    if u.shape[-1] % 2 or shift.shape != bias.shape or shift.dtype != u.dtype:
        raise ValueError(f"gated_depthwise_conv3x3: expected an even number of channels 2C and a shift (2C,) of "
                         f"u's dtype, got u {u.shape} {u.dtype} and shift {shift.shape} {shift.dtype}")
    if resolved == "native":
        return _native_gated(u, shift, kernel, bias)
    y = depthwise_conv3x3(jax.nn.silu(u + shift), kernel, bias, impl=resolved)
    values, gates = jnp.split(y, 2, axis=-1)
    return values * jax.nn.silu(gates)

"""The C++ attention kernels (`attention.cc`): building, registering and typing their FFI calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sana_jax.kernels import native

LINEAR_FORWARD = "sana_linear_attention"
LINEAR_BACKWARD = "sana_linear_attention_backward"
CROSS_FORWARD = "sana_cross_attention"
CROSS_BACKWARD = "sana_cross_attention_backward"
_HANDLERS = ((LINEAR_FORWARD, "SanaLinearAttention"), (LINEAR_BACKWARD, "SanaLinearAttentionBackward"),
             (CROSS_FORWARD, "SanaCrossAttention"), (CROSS_BACKWARD, "SanaCrossAttentionBackward"))


def build_failure() -> str | None:
    """Why the kernels' library cannot be had here (built, loaded and registered), or None."""
    return native.registration_failure("attention", _HANDLERS)


def require() -> None:
    """Builds and registers the kernels; NativeBuildError (one line) where that fails."""
    if (reason := build_failure()) is not None:
        raise native.NativeBuildError(reason)


def unsupported(q: jax.Array) -> str | None:
    """Why the kernels cannot run on queries q (B, N, H, d) here, or None when they can."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not 'cpu'"
    if q.dtype != jnp.float32:
        return f"dtype {q.dtype} is not float32"
    if q.ndim != 4 or q.shape[-1] % 16 or not 16 <= q.shape[-1] <= 128:
        return f"head dim {q.shape[-1]} is not a multiple of 16 up to 128"
    return build_failure()


def result(a: jax.Array, shape: tuple[int, ...], axes: tuple[int | None, ...]) -> jax.ShapeDtypeStruct:
    """An FFI result's type: `shape`, float32, axis i sharded as a's axis `axes[i]` (None: whole). Under Explicit
    mesh axes a result's type names its mesh axes."""
    sharding = jax.typeof(a).sharding
    spec = (*sharding.spec, *(None,) * (a.ndim - len(sharding.spec)))
    named = NamedSharding(sharding.mesh, PartitionSpec(*(None if i is None else spec[i] for i in axes)))
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=named)

"""`SanaConfig` and the named presets."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

QK_NORMS = (None, "rms_norm_across_heads")
COMPUTE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "native", "triton")
REMAT_POLICIES = ("none", "full", "dots")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """Architecture and numerics of a SANA linear DiT.

    A static pytree node (no leaves), so a config can be passed straight through `jax.jit`,
    `jax.eval_shape` and `jax.vmap` as an ordinary argument.

    Widths: hidden = num_heads * head_dim; the cross-attention projects to
    cross_num_heads * cross_head_dim (== hidden for every SANA model); the Mix-FFN
    has int(mlp_ratio * hidden) channels after its gate.
    """

    depth: int = 20
    num_heads: int = 70
    head_dim: int = 32
    cross_num_heads: int = 20
    cross_head_dim: int = 112
    mlp_ratio: float = 2.5
    in_channels: int = 32
    out_channels: int = 32
    caption_channels: int = 2304
    patch_size: int = 1
    sample_size: int = 32
    qk_norm: str | None = None
    # A 2-D sin-cos positional embedding added to the patch embedding, with positions divided by this scale
    # (SANA's 2K/4K models; diffusers' `interpolation_scale`). None: no positional embedding, as the 512 and
    # 1024 px models.
    interpolation_scale: float | None = None
    # Numerics. Linear attention always accumulates in float32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Who computes the two attentions' cores: "xla" (jnp, autodiff), "native" (C++ kernels: CPU, float32, head dims
    # a multiple of 16 up to 128), "triton" (the linear attention's Triton kernels: GPU; the cross-attention in
    # XLA), or "auto": native where it can run, else xla (`sana_jax.kernels`).
    attention_impl: str = "auto"
    attention_eps: float = 1e-15
    remat: str = "none"
    # Run the blocks (stacked weights either way) as an unrolled loop instead of a scan; None: unrolled on
    # the CPU backend, scanned on accelerators (`blocks_unrolled`). On CPU the scan writes every residual of
    # every block into depth-long buffers, and a training step takes about 2x as long as unrolled
    # (docs/performance.md); the unrolled program's compile time grows with depth.
    unroll_blocks: bool | None = None
    # Run the batch as this many sub-batches, independent computations of one program (results concatenated):
    # XLA's CPU runtime overlaps independent kernels, which fills the cores during its serial stretches, so
    # on CPU 2 parts train about 1.15x faster (docs/performance.md). Leave 1 on accelerators.
    batch_splits: int = 1
    # Initialisation of the caption RMSNorm weight (SANA trains with 0.01).
    caption_norm_init: float = 0.01

    def __post_init__(self):
        def check(field: str, ok: bool, expected: str):
            if not ok:
                raise ValueError(f"SanaConfig.{field}={getattr(self, field)!r}: expected {expected}")

        for field in ("depth", "num_heads", "head_dim", "cross_num_heads", "cross_head_dim",
                      "in_channels", "out_channels", "caption_channels", "patch_size", "sample_size",
                      "batch_splits"):
            value = getattr(self, field)
            check(field, isinstance(value, int) and value > 0, "a positive integer")
        check("unroll_blocks", self.unroll_blocks is None or isinstance(self.unroll_blocks, bool),
              "True, False or None (unrolled on CPU, scanned on accelerators)")
        check("interpolation_scale", self.interpolation_scale is None
              or (isinstance(self.interpolation_scale, int | float) and self.interpolation_scale > 0
                  and self.hidden % 4 == 0), f"None or a positive number (with a hidden size {self.hidden} "
              "divisible by 4)")
        check("mlp_ratio", self.mlp_ratio > 0, "a positive number")
        check("qk_norm", self.qk_norm in QK_NORMS, f"one of {QK_NORMS}")
        check("compute_dtype", self.compute_dtype in COMPUTE_DTYPES, f"one of {COMPUTE_DTYPES}")
        check("param_dtype", self.param_dtype in PARAM_DTYPES, f"one of {PARAM_DTYPES}")
        check("attention_impl", self.attention_impl in ATTENTION_IMPLS, f"one of {ATTENTION_IMPLS}")
        check("remat", self.remat in REMAT_POLICIES, f"one of {REMAT_POLICIES}")
        check("cross_num_heads", self.cross_num_heads * self.cross_head_dim == self.hidden,
              f"cross_num_heads * cross_head_dim == hidden ({self.hidden})")

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden)

    def blocks_unrolled(self) -> bool:
        """Whether the loop over blocks runs unrolled: `unroll_blocks`, or for None, whether JAX's default
        backend is the CPU."""
        if self.unroll_blocks is None:
            return jax.default_backend() == "cpu"
        return self.unroll_blocks

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SanaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SanaConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


_SANA_2240 = dict(num_heads=70, head_dim=32, cross_num_heads=20, cross_head_dim=112)

PRESETS: dict[str, SanaConfig] = {
    "sana_600m": SanaConfig(depth=28, num_heads=36, head_dim=32, cross_num_heads=16, cross_head_dim=72),
    "sana_1600m": SanaConfig(depth=20, **_SANA_2240),
    "sana1.5_1600m": SanaConfig(depth=20, qk_norm="rms_norm_across_heads", **_SANA_2240),
    "sana1.5_3200m": SanaConfig(depth=40, qk_norm="rms_norm_across_heads", **_SANA_2240),
    "sana1.5_4800m": SanaConfig(depth=60, qk_norm="rms_norm_across_heads", **_SANA_2240),
    # Test sizes. "tiny" matches the tiny diffusers model of the parity tests.
    "tiny": SanaConfig(depth=2, num_heads=2, head_dim=8, cross_num_heads=2, cross_head_dim=8,
                       in_channels=4, out_channels=4, caption_channels=12, sample_size=8,
                       qk_norm="rms_norm_across_heads"),
    # The mid-size model of the CPU benchmarks (tools/bench/bench_model.py, docs/performance.md).
    "small": SanaConfig(depth=6, num_heads=8, head_dim=32, cross_num_heads=8, cross_head_dim=32,
                        in_channels=32, out_channels=32, caption_channels=256, sample_size=16,
                        qk_norm="rms_norm_across_heads"),
}


def preset(name: str) -> SanaConfig:
    """Returns the named `SanaConfig` (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]

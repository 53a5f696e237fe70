"""The SANA linear diffusion transformer as Flax linen modules over a plain params pytree.

Layout: latents (B, H, W, C) channels-last; tokens in row-major (h, w) order of the patch grid.
The blocks run under `nn.scan`, so their weights carry a leading depth axis under params["blocks"].
Logical axis names on every weight (see `LOGICAL_AXIS_RULES`) let the trainer shard them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.kernels import native_attention
from sana_jax.kernels.cross_attention import cross_attention
from sana_jax.kernels.depthwise_conv import gated_depthwise_conv3x3
from sana_jax.kernels.linear_attention import linear_attention, linear_attention_xla
from sana_jax.model.config import SanaConfig

TIMESTEP_CHANNELS = 256
MASK_BIAS = -10000.0
LAYERNORM_EPS = 1e-6
RMSNORM_EPS = 1e-5

# Logical axis -> mesh axis for FSDP: the hidden width is sharded, everything else replicated.
LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("heads", None),
    ("mlp", None),
    ("layers", None),
    ("caption", None),
)

_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _matmul_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., in) @ kernel (in, out) -> (..., out), x flattened to a matrix for the product.

    On XLA's CPU backend that spares the backward the transposed copies a (B, N, in) operand costs
    (forward+backward 9-20 % faster, same numbers; docs/performance.md).
    """
    return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel (in, out), cast to the compute dtype. With `defer_bias`, (x @ kernel, bias)
    for a consumer that adds the bias itself."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    defer_bias: bool = False
    kernel_init: nn.initializers.Initializer = _xavier
    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        kernel = _param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes,
                        self.param_dtype)
        y = _matmul_rows(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = _param(self, "bias", _zeros, (self.features,), (self.axes[1],), self.param_dtype)
            if self.defer_bias:
                return y, bias.astype(self.dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, the statistic in float32."""

    axis_name: str = "embed"
    eps: float = RMSNORM_EPS
    scale_init: float = 1.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.constant(self.scale_init), (x.shape[-1],),
                       (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = LAYERNORM_EPS) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_embedding(timesteps: jax.Array, channels: int = TIMESTEP_CHANNELS) -> jax.Array:
    """(B,) timesteps -> (B, channels) float32 sinusoids ordered [cos, sin], freqs exp(-ln(1e4) i / half)."""
    half = channels // 2
    # Frequencies as host constants: the exponent rounded in float32 as the references compute it, then a
    # correctly rounded exp. One ulp of a frequency moves the angle at t = 999 by 6e-5.
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_position_embedding(height: int, width: int, dim: int, *, base_size: int,
                              interpolation_scale: float) -> np.ndarray:
    """(height * width, dim) float32 positional embedding of a row-major token grid, as diffusers'
    `get_2d_sincos_pos_embed(dim, (height, width), base_size=..., interpolation_scale=...)`.

    Positions are `index / (side / base_size) / interpolation_scale` in float32; the first dim/2 channels
    encode the column, the last dim/2 the row, each as [sin, cos] of position * 10000^(-k / (dim / 4)).
    """
    rows = np.arange(height, dtype=np.float32) / np.float32(height / base_size) / np.float32(interpolation_scale)
    cols = np.arange(width, dtype=np.float32) / np.float32(width / base_size) / np.float32(interpolation_scale)
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def embed(positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    col_grid, row_grid = np.meshgrid(cols, rows)  # each (height, width)
    return np.concatenate([embed(col_grid), embed(row_grid)], axis=1).astype(np.float32)


class LinearSelfAttention(nn.Module):
    """ReLU linear self-attention; q/k/v without bias, output projection with bias."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(Dense, cfg.hidden, param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        q = dense(("embed", "heads"), use_bias=False, name="to_q")(x)
        k = dense(("embed", "heads"), use_bias=False, name="to_k")(x)
        v = dense(("embed", "heads"), use_bias=False, name="to_v")(x)
        if cfg.qk_norm is not None:
            q = RMSNorm("heads", param_dtype=cfg.param_dtype, name="norm_q")(q)
            k = RMSNorm("heads", param_dtype=cfg.param_dtype, name="norm_k")(k)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.head_dim)
        out = _linear_attention(split(q), split(k), split(v), cfg)
        out = out.reshape(*x.shape[:-1], cfg.hidden)
        return dense(("heads", "embed"), name="to_out")(out)


def _attention_impl(cfg: SanaConfig, q: jax.Array) -> str:
    """cfg.attention_impl for queries q (B, N, H, d); "auto": "native" where the C++ kernels run, else "xla"."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    return "native" if native_attention.unsupported(q) is None else "xla"


def _linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SanaConfig) -> jax.Array:
    impl = _attention_impl(cfg, q)
    if impl == "xla":
        return linear_attention_xla(q, k, v, cfg.attention_eps)
    return linear_attention(q, k, v, eps=cfg.attention_eps, impl=impl)


class CrossAttention(nn.Module):
    """Softmax cross-attention from image tokens to caption tokens; all projections have bias."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: jax.Array, caption: jax.Array, caption_bias: jax.Array) -> jax.Array:
        """x (B, N, D), caption (B, L, D), caption_bias (B, L) additive float32 -> (B, N, D)."""
        cfg = self.config
        dense = functools.partial(Dense, cfg.hidden, param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        q = dense(("embed", "heads"), name="to_q")(x)
        k = dense(("embed", "heads"), name="to_k")(caption)
        v = dense(("embed", "heads"), name="to_v")(caption)
        if cfg.qk_norm is not None:
            q = RMSNorm("heads", param_dtype=cfg.param_dtype, name="norm_q")(q)
            k = RMSNorm("heads", param_dtype=cfg.param_dtype, name="norm_k")(k)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.cross_num_heads, cfg.cross_head_dim)
        q, k, v = split(q), split(k), split(v)
        impl = "xla" if cfg.attention_impl == "triton" else cfg.attention_impl  # no Triton cross-attention
        out = cross_attention(q, k, v, caption_bias, impl=impl).reshape(*x.shape[:-1], cfg.hidden)
        # Zero-initialised: the ungated cross-attention starts as a no-op.
        return dense(("heads", "embed"), kernel_init=_zeros, name="to_out")(out)


class PatchEmbed(nn.Module):
    """(B, N, p*p*C) flattened patches -> (B, N, D); the kernel keeps the conv's (p, p, C, D) shape."""

    config: SanaConfig

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        kernel = _param(self, "kernel", _xavier, (p, p, cfg.in_channels, cfg.hidden),
                        (None, None, None, "embed"), cfg.param_dtype)
        bias = _param(self, "bias", _zeros, (cfg.hidden,), ("embed",), cfg.param_dtype)
        kernel = kernel.reshape(-1, cfg.hidden).astype(patches.dtype)
        return _matmul_rows(patches, kernel) + bias.astype(patches.dtype)


class TimeEmbed(nn.Module):
    """(B,) timesteps -> emb (B, D) and the blocks' modulation t6 (B, 6D), both float32."""

    config: SanaConfig

    @nn.compact
    def __call__(self, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dense = functools.partial(Dense, kernel_init=_normal, param_dtype=cfg.param_dtype, dtype=jnp.float32)
        emb = dense(cfg.hidden, (None, "embed"), name="linear_1")(timestep_embedding(timesteps))
        emb = dense(cfg.hidden, ("embed", "mlp"), name="linear_2")(jax.nn.silu(emb))
        t6 = dense(6 * cfg.hidden, ("embed", "mlp"), name="linear")(jax.nn.silu(emb))
        return emb, t6


class CaptionProjection(nn.Module):
    """(B, L, C_text) text features -> (B, L, D): Linear, tanh-GELU, Linear."""

    config: SanaConfig

    @nn.compact
    def __call__(self, text: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(Dense, cfg.hidden, kernel_init=_normal, param_dtype=cfg.param_dtype,
                                  dtype=cfg.compute_dtype)
        x = dense(("caption", "embed"), name="linear_1")(text)
        return dense(("embed", "mlp"), name="linear_2")(jax.nn.gelu(x, approximate=True))


class GatedDepthwiseConv3x3(nn.Module):
    """SiLU(u + shift), 3x3 depthwise convolution with bias, x * SiLU(gate): u (B, h, w, 2C), shift (2C,)
    -> (B, h, w, C); kernel (3, 3, 2C)."""

    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, u: jax.Array, shift: jax.Array) -> jax.Array:
        channels = u.shape[-1]
        # PyTorch's default for a depthwise conv: uniform(+-1/sqrt(9)).
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=(0, 1), out_axis=2)
        kernel = _param(self, "kernel", init, (3, 3, channels), (None, None, "mlp"), self.param_dtype)
        bias = _param(self, "bias", _zeros, (channels,), ("mlp",), self.param_dtype)
        return gated_depthwise_conv3x3(*(a.astype(self.dtype) for a in (u, shift, kernel, bias)))


class GLUMBConv(nn.Module):
    """Mix-FFN: 1x1 conv D -> 2H, SiLU, 3x3 depthwise, x * SiLU(gate), 1x1 conv H -> D (no bias)."""

    config: SanaConfig
    height: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, N, D) with N = height * width -> (B, N, D)."""
        cfg = self.config
        hidden = cfg.mlp_hidden
        dense = functools.partial(Dense, param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        # conv_inverted's bias is added inside the gated convolution (one pass fewer over the widest activation).
        product, shift = dense(2 * hidden, ("embed", "mlp"), defer_bias=True, name="conv_inverted")(x)
        grid = product.reshape(x.shape[0], self.height, self.width, 2 * hidden)
        gated = GatedDepthwiseConv3x3(cfg.param_dtype, cfg.compute_dtype, name="conv_depth")(grid, shift)
        gated = gated.reshape(x.shape[0], -1, hidden)
        return dense(cfg.hidden, ("mlp", "embed"), use_bias=False, name="conv_point")(gated)


class SanaBlock(nn.Module):
    """One SANA block: modulated linear self-attention, cross-attention, modulated Mix-FFN.

    Written for `nn.scan`: (x, t6, caption, caption_bias) -> (x, x if collect_hidden else None).
    """

    config: SanaConfig
    height: int
    width: int
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x, t6, caption, caption_bias):
        cfg = self.config
        table = _param(self, "scale_shift_table", nn.initializers.normal(cfg.hidden ** -0.5),
                       (6, cfg.hidden), (None, "embed"), cfg.param_dtype)
        modulation = (table[None].astype(jnp.float32) + t6.reshape(-1, 6, cfg.hidden)).astype(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=1)

        attn_in = layer_norm(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * LinearSelfAttention(cfg, name="attn1")(attn_in)
        x = x + CrossAttention(cfg, name="attn2")(x, caption, caption_bias)
        ffn_in = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * GLUMBConv(cfg, self.height, self.width, name="ff")(ffn_in)
        return x, (x if self.collect_hidden else None)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SanaTransformer(nn.Module):
    """latents (B, H, W, C_in), timesteps (B,), text (B, L, C_text), text_mask (B, L) -> (B, H, W, C_out).

    With `collect_hidden`, also returns the residual stream (depth + 1, B, N, D): entry 0 enters block 0,
    entry i + 1 leaves block i.
    """

    config: SanaConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, latents, timesteps, text, text_mask):
        cfg = self.config
        dtype = jnp.dtype(cfg.compute_dtype)
        dense = functools.partial(Dense, param_dtype=cfg.param_dtype, dtype=dtype)
        _check_inputs(latents, timesteps, text, text_mask)
        batch, height, width, channels = latents.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size={p}")
        if channels != cfg.in_channels:
            raise ValueError(f"latents have {channels} channels; config.in_channels={cfg.in_channels}")
        if text.shape[-1] != cfg.caption_channels:
            raise ValueError(f"text features have {text.shape[-1]} channels; "
                             f"config.caption_channels={cfg.caption_channels}")
        h, w = height // p, width // p

        # Patch embedding: a p x p stride-p convolution, as a matmul on (p, p, C) patches.
        patches = latents.reshape(batch, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, h * w, p * p * channels).astype(dtype)
        x = PatchEmbed(cfg, name="patch_embed")(patches)
        if cfg.interpolation_scale is not None:
            x = x + sincos_position_embedding(h, w, cfg.hidden, base_size=cfg.sample_size // p,
                                              interpolation_scale=cfg.interpolation_scale).astype(dtype)

        # Timestep: sinusoid -> MLP (emb, D) -> 6D modulation shared by every block.
        emb, t6 = TimeEmbed(cfg, name="time_embed")(timesteps)

        # Masked tokens are replaced, not only down-weighted: a NaN or inf there cannot reach the output.
        kept = text_mask[..., None] > 0
        caption = CaptionProjection(cfg, name="caption_projection")(jnp.where(kept, text, 0).astype(dtype))
        caption = RMSNorm("embed", scale_init=cfg.caption_norm_init, param_dtype=cfg.param_dtype,
                          name="caption_norm")(caption)
        caption_bias = (1.0 - text_mask.astype(jnp.float32)) * MASK_BIAS

        block = SanaBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            unroll=cfg.depth if cfg.blocks_unrolled() else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, h, w, self.collect_hidden, name="blocks")
        x_in = x
        x, hidden = blocks(x, t6, caption, caption_bias)

        table = _param(self, "scale_shift_table", nn.initializers.normal(cfg.hidden ** -0.5),
                       (2, cfg.hidden), (None, "embed"), cfg.param_dtype)
        shift, scale = jnp.split((table[None].astype(jnp.float32) + emb[:, None]).astype(dtype), 2, axis=1)
        x = layer_norm(x) * (1 + scale) + shift
        x = dense(p * p * cfg.out_channels, ("embed", None), kernel_init=_zeros, name="proj_out")(x)
        x = x.reshape(batch, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        velocity = x.reshape(batch, height, width, cfg.out_channels).astype(jnp.float32)
        if self.collect_hidden:
            return velocity, jnp.concatenate([x_in[None], hidden], axis=0)
        return velocity


def _check_inputs(latents, timesteps, text, text_mask):
    """One-line errors for inputs of the wrong rank or shape, and for masks that are not 0/1."""
    ranks = {"latents": (latents, 4, "(B, H, W, C)"), "timesteps": (timesteps, 1, "(B,)"),
             "text": (text, 3, "(B, L, C_text)"), "text_mask": (text_mask, 2, "(B, L)")}
    for name, (array, rank, layout) in ranks.items():
        if jnp.ndim(array) != rank:
            raise ValueError(f"{name} has shape {jnp.shape(array)}: expected {layout}")
    batch = latents.shape[0]
    for name, array in (("timesteps", timesteps), ("text", text), ("text_mask", text_mask)):
        if array.shape[0] != batch:
            raise ValueError(f"{name} has batch {array.shape[0]}, latents have {batch}")
    if text_mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask shape {text_mask.shape} does not match text {text.shape[:2]}")
    if not isinstance(text_mask, jax.core.Tracer):
        values = np.unique(np.asarray(text_mask))
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"text_mask holds {values[~np.isin(values, (0, 1))][:5].tolist()}: expected 0/1")


def _dummy_inputs(config: SanaConfig):
    side = 2 * config.patch_size
    return (jnp.zeros((1, side, side, config.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, config.caption_channels), jnp.float32), jnp.ones((1, 1), jnp.int32))


def init_params(config: SanaConfig, key: jax.Array) -> dict:
    """Random parameters: a nested dict of arrays, block weights stacked on a leading depth axis.

    The values do not depend on `config.unroll_blocks`: the blocks are initialised through the scanned loop,
    which XLA compiles several times faster than the unrolled one (docs/performance.md).
    """
    variables = SanaTransformer(dataclasses.replace(config, unroll_blocks=False)).init(key, *_dummy_inputs(config))
    return nn.meta.unbox(variables["params"])


def logical_axes(config: SanaConfig) -> dict:
    """The params tree with a `PartitionSpec` of logical axis names per leaf (no allocation)."""
    boxed = jax.eval_shape(lambda: SanaTransformer(config).init(jax.random.key(0), *_dummy_inputs(config)))
    return nn.get_partition_spec(boxed)["params"]


def param_count(config: SanaConfig) -> int:
    """Number of parameters of `config`'s model (no allocation)."""
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def forward(params: dict, config: SanaConfig, latents: jax.Array, timesteps: jax.Array, text: jax.Array,
            text_mask: jax.Array) -> jax.Array:
    """Predicted flow velocity (B, H, W, C_out) float32.

    Args:
      latents: (B, H, W, C_in) noisy latents.
      timesteps: (B,) model timesteps, sigma * 1000 truncated to integers.
      text: (B, L, C_text) caption features; text_mask: (B, L) of 0/1 (0: the token is ignored, whatever
        its features hold).

    With `config.batch_splits` > 1 the batch runs as that many near-equal parts, concatenated; the same
    numbers up to float32 rounding.
    """
    model = SanaTransformer(config)
    batch = jnp.shape(latents)[0]
    if config.batch_splits == 1 or batch < 2:
        return model.apply({"params": params}, latents, timesteps, text, text_mask)
    _check_inputs(latents, timesteps, text, text_mask)
    bounds = np.linspace(0, batch, min(config.batch_splits, batch) + 1).round().astype(int)
    parts = [model.apply({"params": params}, *(a[start:stop] for a in (latents, timesteps, text, text_mask)))
             for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    return jnp.concatenate(parts, axis=0)


def forward_with_hidden(params: dict, config: SanaConfig, latents: jax.Array, timesteps: jax.Array,
                        text: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`forward` plus the residual stream (depth + 1, B, N, D) around every block."""
    return SanaTransformer(config, collect_hidden=True).apply(
        {"params": params}, latents, timesteps, text, text_mask)

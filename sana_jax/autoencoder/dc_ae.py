"""DC-AE (deep compression autoencoder, diffusers `AutoencoderDC`) as Flax linen modules, channels-last.

Images are (B, H, W, in_channels) in [-1, 1]; raw (unscaled) latents are (B, H/f, W/f, latent_channels)
with f = config.downsample. Module and parameter names follow diffusers' state-dict keys (a list index
`.i` becomes `_i`), so `sana_jax.autoencoder.convert` maps one onto the other by rule.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sana_jax.autoencoder.config import DCAEConfig
from sana_jax.kernels import linear_attention_xla

NORM_EPS = 1e-5
ATTENTION_EPS = 1e-15
GLU_EXPANSION = 4
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "mish": jax.nn.mish,
}


def conv(features: int, size: int, name: str, *, stride: int = 1, groups: int = 1,
         use_bias: bool = True) -> nn.Conv:
    """A square convolution with PyTorch's symmetric zero padding size // 2."""
    pad = size // 2
    return nn.Conv(features, (size, size), strides=stride, padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias, name=name)


def space_to_depth(x: jax.Array, factor: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, H/r, W/r, C*r*r), channel order (c, i, j) as torch's pixel_unshuffle."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def depth_to_space(x: jax.Array, factor: int = 2) -> jax.Array:
    """(B, h, w, C*r*r) -> (B, h*r, w*r, C), the inverse of `space_to_depth` (torch's pixel_shuffle)."""
    b, h, w, c = x.shape
    c //= factor * factor
    x = x.reshape(b, h, w, c, factor, factor)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c)


def group_mean(x: jax.Array, groups: int) -> jax.Array:
    """Averages consecutive runs of channels: (..., C) -> (..., groups)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).mean(-1)


class RMSNorm(nn.Module):
    """RMSNorm over channels with a scale and a bias (eps 1e-5)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + NORM_EPS)
        return x * scale + bias


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm over channels; the running statistics are stored as parameters."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = self.param("mean", nn.initializers.zeros, (channels,))
        var = self.param("var", nn.initializers.ones, (channels,))
        return (x - mean) * jax.lax.rsqrt(var + NORM_EPS) * scale + bias


def norm(norm_type: str, name: str) -> nn.Module:
    return {"rms_norm": RMSNorm, "batch_norm": FrozenBatchNorm}[norm_type](name=name)


class ResBlock(nn.Module):
    """x + norm(conv3x3(act(conv3x3(x)))), the second conv without bias."""

    norm_type: str
    act_fn: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = ACTIVATIONS[self.act_fn](conv(channels, 3, "conv1")(x))
        h = conv(channels, 3, "conv2", use_bias=False)(h)
        return x + norm(self.norm_type, "norm")(h)


class MultiscaleProjection(nn.Module):
    """Aggregates q, k, v over a k x k neighbourhood: depthwise k x k, then a 1x1 conv within each head."""

    kernel_size: int
    num_groups: int

    @nn.compact
    def __call__(self, qkv: jax.Array) -> jax.Array:
        channels = qkv.shape[-1]
        qkv = conv(channels, self.kernel_size, "proj_in", groups=channels, use_bias=False)(qkv)
        return conv(channels, 1, "proj_out", groups=self.num_groups, use_bias=False)(qkv)


class MultiscaleLinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention with a residual connection.

    q, k, v (no bias) are concatenated and, per kernel size, aggregated by a `MultiscaleProjection`;
    the concatenation of all scales is cut into heads of 3 * head_dim consecutive channels (q, k, v).
    """

    head_dim: int
    kernel_sizes: tuple[int, ...]
    norm_type: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, channels = x.shape
        heads = channels // self.head_dim
        inner = heads * self.head_dim
        dense = functools.partial(nn.Dense, inner, use_bias=False)
        qkv = jnp.concatenate([dense(name=f"to_{n}")(x) for n in "qkv"], axis=-1)
        scales = [qkv] + [MultiscaleProjection(size, 3 * heads, name=f"to_qkv_multiscale_{i}")(qkv)
                          for i, size in enumerate(self.kernel_sizes)]
        qkv = jnp.concatenate(scales, axis=-1).reshape(b, h * w, -1, 3, self.head_dim)
        # The reference switches to a quadratic form when h * w <= head_dim; it computes the same quantity.
        out = linear_attention_xla(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], ATTENTION_EPS)
        out = nn.Dense(channels, use_bias=False, name="to_out")(out.reshape(b, h, w, -1))
        return x + norm(self.norm_type, "norm_out")(out)


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 C -> 8C, SiLU, 3x3 depthwise, x * SiLU(gate), 1x1 4C -> C, RMSNorm."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        hidden = GLU_EXPANSION * channels
        h = jax.nn.silu(conv(2 * hidden, 1, "conv_inverted")(x))
        h, gate = jnp.split(conv(2 * hidden, 3, "conv_depth", groups=2 * hidden)(h), 2, axis=-1)
        h = conv(channels, 1, "conv_point", use_bias=False)(h * jax.nn.silu(gate))
        return x + RMSNorm(name="norm")(h)


class EfficientViTBlock(nn.Module):
    """Multi-scale linear attention (context) followed by a GLUMBConv (local mixing)."""

    head_dim: int
    kernel_sizes: tuple[int, ...]
    norm_type: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = MultiscaleLinearAttention(self.head_dim, self.kernel_sizes, self.norm_type, name="attn")(x)
        return GLUMBConv(name="conv_out")(x)


def block(config: DCAEConfig, block_type: str, kernel_sizes: tuple[int, ...], norm_type: str, act_fn: str,
          name: str) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(norm_type, act_fn, name=name)
    return EfficientViTBlock(config.attention_head_dim, kernel_sizes, norm_type, name=name)


class DownBlock(nn.Module):
    """Halves the resolution: a stride-2 conv, or a conv followed by pixel-unshuffle.

    The shortcut pixel-unshuffles the input and averages groups of consecutive channels down to
    `out_channels`.
    """

    out_channels: int
    pixel_unshuffle: bool
    shortcut: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pixel_unshuffle:
            y = space_to_depth(conv(self.out_channels // 4, 3, "conv")(x))
        else:
            y = conv(self.out_channels, 3, "conv", stride=2)(x)
        if self.shortcut:
            y = y + group_mean(space_to_depth(x), self.out_channels)
        return y


class UpBlock(nn.Module):
    """Doubles the resolution: nearest upsampling then a conv, or a conv followed by pixel-shuffle.

    The shortcut repeats each input channel to 4 * out_channels and pixel-shuffles.
    """

    out_channels: int
    interpolate: bool
    shortcut: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.interpolate:
            y = conv(self.out_channels, 3, "conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        else:
            y = depth_to_space(conv(4 * self.out_channels, 3, "conv")(x))
        if self.shortcut:
            y = y + depth_to_space(jnp.repeat(x, 4 * self.out_channels // x.shape[-1], axis=-1))
        return y


class Encoder(nn.Module):
    """(B, H, W, in_channels) in [-1, 1] -> raw latents (B, H/f, W/f, latent_channels)."""

    config: DCAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        pixel_unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            x = conv(widths[0], 3, "conv_in")(x)
        else:
            x = DownBlock(widths[1], pixel_unshuffle, shortcut=False, name="conv_in")(x)
        for i, count in enumerate(layers):
            for j in range(count):
                x = block(cfg, cfg.encoder_block_types[i], cfg.encoder_qkv_multiscales[i], "rms_norm", "silu",
                          name=f"down_blocks_{i}_{j}")(x)
            if i < cfg.num_stages - 1 and count > 0:
                name = f"down_blocks_{i}_{count}"
                x = DownBlock(widths[i + 1], pixel_unshuffle, shortcut=True, name=name)(x)
        out = conv(cfg.latent_channels, 3, "conv_out")(x)
        if cfg.encoder_out_shortcut:
            out = out + group_mean(x, cfg.latent_channels)
        return out


class Decoder(nn.Module):
    """Raw latents (B, h, w, latent_channels) -> (B, h*f, w*f, in_channels), nominally in [-1, 1]."""

    config: DCAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        x = conv(widths[-1], 3, "conv_in")(z)
        if cfg.decoder_in_shortcut:
            x = x + jnp.repeat(z, widths[-1] // cfg.latent_channels, axis=-1)
        for i in reversed(range(cfg.num_stages)):
            first = 0
            if i < cfg.num_stages - 1 and layers[i] > 0:
                x = UpBlock(widths[i], interpolate, shortcut=True, name=f"up_blocks_{i}_0")(x)
                first = 1
            for j in range(first, first + layers[i]):
                x = block(cfg, cfg.decoder_block_types[i], cfg.decoder_qkv_multiscales[i],
                          cfg.decoder_norm_types[i], cfg.decoder_act_fns[i], name=f"up_blocks_{i}_{j}")(x)
        x = ACTIVATIONS[cfg.decoder_conv_act_fn](RMSNorm(name="norm_out")(x))
        if layers[0] > 0:
            return conv(cfg.in_channels, 3, "conv_out")(x)
        return UpBlock(cfg.in_channels, interpolate, shortcut=False, name="conv_out")(x)


def _check(name: str, x: jax.Array, channels: int, multiple: int):
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{name} of shape {tuple(x.shape)}: expected (B, H, W, {channels}) "
                         f"with H and W multiples of {multiple}")


def init_params(config: DCAEConfig, key: jax.Array) -> dict:
    """Random parameters {"encoder": ..., "decoder": ...} (flax default initialisers, unit norms)."""
    enc_key, dec_key = jax.random.split(key)
    side = config.downsample
    image = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    latent = jnp.zeros((1, 1, 1, config.latent_channels), jnp.float32)
    return {"encoder": Encoder(config).init(enc_key, image)["params"],
            "decoder": Decoder(config).init(dec_key, latent)["params"]}


@functools.partial(jax.jit, static_argnums=1)
def encode(params: dict, config: DCAEConfig, images: jax.Array) -> jax.Array:
    """Images (B, H, W, in_channels) in [-1, 1] -> raw latents (B, H/f, W/f, latent_channels), float32.

    Jitted with `config` static (one compile per config and input shape).
    """
    _check("images", images, config.in_channels, config.downsample)
    return Encoder(config).apply({"params": params["encoder"]}, images.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=1)
def decode(params: dict, config: DCAEConfig, latents: jax.Array) -> jax.Array:
    """Raw latents (B, h, w, latent_channels) -> images (B, h*f, w*f, in_channels), nominally in [-1, 1].

    Jitted with `config` static (one compile per config and input shape).
    """
    _check("latents", latents, config.latent_channels, 1)
    return Decoder(config).apply({"params": params["decoder"]}, latents.astype(jnp.float32))

"""`DCAEConfig`: the architecture of a DC-AE, read from a diffusers `AutoencoderDC` config.json."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv", "Conv")
NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "mish")
# Fields given either once for all stages or once per stage.
_PER_STAGE = ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns")


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Architecture of a DC-AE; field names and defaults are those of diffusers' `AutoencoderDC`.

    Stage i of the encoder (and decoder) works at 1/2**i of the image resolution with
    `*_block_out_channels[i]` channels and `*_layers_per_block[i]` blocks of type `*_block_types[i]`;
    the latent has `latent_channels` channels at 1/downsample of the image resolution.
    Per-stage fields are tuples with one entry per stage (`from_diffusers_config` expands strings).
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 6
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 6
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self):
        stages = self.num_stages

        def check(field: str, ok: bool, expected: str):
            if not ok:
                raise ValueError(f"DCAEConfig.{field}={getattr(self, field)!r}: expected {expected}")

        def per_stage(field: str, valid: Callable[[Any], bool], expected: str):
            values = getattr(self, field)
            check(field, isinstance(values, tuple) and len(values) == stages and all(map(valid, values)),
                  f"a tuple of {stages} (one per stage) {expected}")

        is_int = lambda value, low: isinstance(value, int) and value >= low
        for field in ("in_channels", "latent_channels", "attention_head_dim"):
            check(field, is_int(getattr(self, field), 1), "a positive integer")
        check("scaling_factor", self.scaling_factor > 0, "a positive number")
        check("encoder_block_out_channels", stages > 0, "at least one stage")
        for side in ("encoder", "decoder"):
            per_stage(f"{side}_block_out_channels", lambda w: is_int(w, 1), "positive widths")
            per_stage(f"{side}_layers_per_block", lambda n: is_int(n, 0), "block counts")
            per_stage(f"{side}_block_types", lambda t: t in BLOCK_TYPES, f"names from {BLOCK_TYPES}")
            per_stage(f"{side}_qkv_multiscales", lambda ks: isinstance(ks, tuple) and all(
                is_int(k, 1) and k % 2 for k in ks), "tuples of odd kernel sizes")
            widths = getattr(self, f"{side}_block_out_channels")
            layers = getattr(self, f"{side}_layers_per_block")
            check(f"{side}_layers_per_block", all(layers[1:]) and (stages > 1 or layers[0]),
                  "blocks in every stage (only the first of several may have none)")
            check(f"{side}_block_out_channels", all(4 * a % b == 0 for a, b in itertools.pairwise(widths)),
                  "each width to divide 4x the width before it (space-to-channel shortcuts)")
            types = getattr(self, f"{side}_block_types")
            head_dim = self.attention_head_dim
            check(f"{side}_block_out_channels", all(
                w % head_dim == 0 for w, t in zip(widths, types, strict=True) if t == "EfficientViTBlock"),
                f"EfficientViTBlock widths divisible by attention_head_dim={self.attention_head_dim}")
        per_stage("decoder_norm_types", lambda n: n in NORM_TYPES, f"names from {NORM_TYPES}")
        per_stage("decoder_act_fns", lambda a: a in ACTIVATIONS, f"names from {ACTIVATIONS}")
        check("decoder_conv_act_fn", self.decoder_conv_act_fn in ACTIVATIONS, f"one of {ACTIVATIONS}")
        check("upsample_block_type", self.upsample_block_type in UPSAMPLE_TYPES, f"one of {UPSAMPLE_TYPES}")
        check("downsample_block_type", self.downsample_block_type in DOWNSAMPLE_TYPES,
              f"one of {DOWNSAMPLE_TYPES}")
        check("encoder_block_out_channels", self.downsample_block_type != "pixel_unshuffle" or all(
            w % 4 == 0 for w in self.encoder_block_out_channels[1:]),
            "widths after the first divisible by 4 (pixel_unshuffle downsampling)")
        shortcut = f"divisible by latent_channels={self.latent_channels} (latent shortcut)"
        check("encoder_block_out_channels", not self.encoder_out_shortcut
              or self.encoder_block_out_channels[-1] % self.latent_channels == 0, f"a last width {shortcut}")
        check("decoder_block_out_channels", not self.decoder_in_shortcut
              or self.decoder_block_out_channels[-1] % self.latent_channels == 0, f"a last width {shortcut}")

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def downsample(self) -> int:
        """Spatial compression factor: image side / latent side."""
        return 2 ** (self.num_stages - 1)

    @classmethod
    def from_diffusers_config(cls, values: Mapping[str, Any]) -> DCAEConfig:
        """Builds the config from a diffusers `AutoencoderDC` config (config.json contents or `model.config`).

        Keys starting with "_" (class name, versions) are ignored; missing keys take diffusers' defaults;
        unknown keys raise.
        """
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderDC config keys {unknown}; known keys: {sorted(known)}")
        stages = len(values.get("encoder_block_out_channels", cls.encoder_block_out_channels))
        for key, value in values.items():
            if key in _PER_STAGE and isinstance(value, str):
                values[key] = (value,) * stages
            elif key.endswith("_qkv_multiscales"):
                values[key] = tuple(tuple(scales) for scales in value)
            elif isinstance(value, list):
                values[key] = tuple(value)
        return cls(**values)


# The SANA latent space: "dc-ae-f32c32-sana-1.0" and "-1.1" (32x compression, 32 latent channels).
F32C32_SANA = DCAEConfig(
    latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    scaling_factor=0.41407,
)

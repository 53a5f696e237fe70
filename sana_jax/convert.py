"""Mappings between SANA parameter trees and the diffusers and NVlabs checkpoint layouts.

One table (`GLOBAL_ENTRIES`, `BLOCK_ENTRIES`) pairs every diffusers `SanaTransformer2DModel` key with
its params path, its layout change and its PyTorch shape; both directions and all shape checks read it.
Native NVlabs (`SanaMS`) checkpoints are renamed into diffusers keys by `NATIVE_*` (fused projections
split by rows) and then take the same path.

`main` is the command line (`tools/convert.py`, `python -m sana_jax.convert`) converting whole checkpoint
folders: `diffusers_to_orbax`, `orbax_to_diffusers` and `sana_pth_to_orbax`, each written beside DST and
renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from absl import flags
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from sana_jax import checkpoint as sana_checkpoint
from sana_jax import cli
from sana_jax.model.config import PARAM_DTYPES, PRESETS, QK_NORMS, SanaConfig
from sana_jax.model.transformer import TIMESTEP_CHANNELS

Params = dict[str, Any]
Shapes = Mapping[str, tuple[int, ...]]


class CheckpointMismatch(ValueError):
    """A checkpoint's keys or shapes differ from what its config implies."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a PyTorch tensor maps to a JAX leaf and back (both take and return NumPy arrays)."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


COPY = Layout(lambda w: w, lambda w: w)
# nn.Linear (out, in) <-> Dense kernel (in, out).
LINEAR = Layout(lambda w: w.T, lambda w: w.T)
# Conv OIHW <-> HWIO.
CONV = Layout(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
# 1x1 conv (out, in, 1, 1) <-> Dense kernel (in, out).
POINTWISE = Layout(lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None])
# Depthwise conv (C, 1, kh, kw) <-> (kh, kw, C).
DEPTHWISE = Layout(lambda w: w[:, 0].transpose(1, 2, 0), lambda w: w.transpose(2, 0, 1)[:, None])


class Entry(NamedTuple):
    """One tensor: diffusers key, params path ("/"-separated), layout, PyTorch shape in named dims."""

    key: str
    path: str
    layout: Layout
    shape: tuple[str | int, ...]
    qk_norm_only: bool = False


def _linear(key: str, path: str, out_dim: str, in_dim: str, bias: bool = True) -> list[Entry]:
    entries = [Entry(f"{key}.weight", f"{path}/kernel", LINEAR, (out_dim, in_dim))]
    if bias:
        entries.append(Entry(f"{key}.bias", f"{path}/bias", COPY, (out_dim,)))
    return entries


def _attention(prefix: str, bias: bool) -> list[Entry]:
    entries = []
    for name in ("to_q", "to_k", "to_v"):
        entries += _linear(f"{prefix}.{name}", f"{prefix}/{name}", "D", "D", bias)
    entries += _linear(f"{prefix}.to_out.0", f"{prefix}/to_out", "D", "D")
    for name in ("norm_q", "norm_k"):
        entries.append(Entry(f"{prefix}.{name}.weight", f"{prefix}/{name}/scale", COPY, ("D",), True))
    return entries


# Named dims (see `_dims`): D hidden, H Mix-FFN width after the gate, p patch size, C_in / C_text input /
# caption channels, P = p * p * out channels, T timestep sinusoid channels.
GLOBAL_ENTRIES: tuple[Entry, ...] = (
    Entry("patch_embed.proj.weight", "patch_embed/kernel", CONV, ("D", "C_in", "p", "p")),
    Entry("patch_embed.proj.bias", "patch_embed/bias", COPY, ("D",)),
    *_linear("time_embed.emb.timestep_embedder.linear_1", "time_embed/linear_1", "D", "T"),
    *_linear("time_embed.emb.timestep_embedder.linear_2", "time_embed/linear_2", "D", "D"),
    *_linear("time_embed.linear", "time_embed/linear", "6D", "D"),
    *_linear("caption_projection.linear_1", "caption_projection/linear_1", "D", "C_text"),
    *_linear("caption_projection.linear_2", "caption_projection/linear_2", "D", "D"),
    Entry("caption_norm.weight", "caption_norm/scale", COPY, ("D",)),
    Entry("scale_shift_table", "scale_shift_table", COPY, (2, "D")),
    *_linear("proj_out", "proj_out", "P", "D"),
)

# Per block; diffusers prefixes "transformer_blocks.{i}.", params stack them on axis 0 under "blocks".
BLOCK_ENTRIES: tuple[Entry, ...] = (
    Entry("scale_shift_table", "scale_shift_table", COPY, (6, "D")),
    *_attention("attn1", bias=False),
    *_attention("attn2", bias=True),
    Entry("ff.conv_inverted.weight", "ff/conv_inverted/kernel", POINTWISE, ("2H", "D", 1, 1)),
    Entry("ff.conv_inverted.bias", "ff/conv_inverted/bias", COPY, ("2H",)),
    Entry("ff.conv_depth.weight", "ff/conv_depth/kernel", DEPTHWISE, ("2H", 1, 3, 3)),
    Entry("ff.conv_depth.bias", "ff/conv_depth/bias", COPY, ("2H",)),
    Entry("ff.conv_point.weight", "ff/conv_point/kernel", POINTWISE, ("D", "H", 1, 1)),
)

def _dims(config: SanaConfig) -> dict[str, int]:
    d, h, p = config.hidden, config.mlp_hidden, config.patch_size
    return {"D": d, "6D": 6 * d, "H": h, "2H": 2 * h, "p": p, "C_in": config.in_channels,
            "C_text": config.caption_channels, "P": p * p * config.out_channels, "T": TIMESTEP_CHANNELS}


def _entries(config: SanaConfig, block: bool) -> list[Entry]:
    table = BLOCK_ENTRIES if block else GLOBAL_ENTRIES
    return [e for e in table if config.qk_norm is not None or not e.qk_norm_only]


def _torch_shape(entry: Entry, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in entry.shape)


def _jax_shape(entry: Entry, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    return entry.layout.to_jax(np.broadcast_to(np.float32(0), torch_shape)).shape


def block_key(index: int, key: str) -> str:
    return f"transformer_blocks.{index}.{key}"


def diffusers_shapes(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers state-dict key of `config` with its PyTorch shape."""
    dims = _dims(config)
    shapes = {e.key: _torch_shape(e, dims) for e in _entries(config, block=False)}
    for i in range(config.depth):
        shapes.update({block_key(i, e.key): _torch_shape(e, dims) for e in _entries(config, block=True)})
    return shapes


def params_shapes(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """Every params path ("/"-separated) of `config` with its JAX shape."""
    dims = _dims(config)
    shapes = {e.path: _jax_shape(e, _torch_shape(e, dims)) for e in _entries(config, block=False)}
    for e in _entries(config, block=True):
        shapes[f"blocks/{e.path}"] = (config.depth, *_jax_shape(e, _torch_shape(e, dims)))
    return shapes


def check_shapes(found: Shapes, expected: Shapes, what: str = "key") -> None:
    """Raises `CheckpointMismatch` listing every missing, unexpected or mis-shaped name."""
    problems = [f"missing {what} {k!r}: expected shape {tuple(expected[k])}, absent from the checkpoint"
                for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {what} {k!r}: shape {tuple(found[k])} in the checkpoint, not expected"
                 for k in sorted(found.keys() - expected.keys())]
    problems += [f"mis-shaped {what} {k!r}: shape {tuple(found[k])} in the checkpoint, "
                 f"expected {tuple(expected[k])}"
                 for k in sorted(found.keys() & expected.keys()) if tuple(found[k]) != tuple(expected[k])]
    if problems:
        raise CheckpointMismatch("\n".join(problems))


def _param_dtype(dtype: str | None, stored: set[str]) -> str:
    """The requested dtype, else bfloat16 when every stored tensor is bfloat16, else float32."""
    if dtype is not None:
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {PARAM_DTYPES}")
        return dtype
    return "bfloat16" if stored == {"bfloat16"} else "float32"


def state_dict_to_params(
    read: Callable[[str], np.ndarray], config: SanaConfig, *, progress: bool = False
) -> Params:
    """Builds params from diffusers tensors `read(key)` (keys and shapes already checked).

    Leaves are NumPy arrays of `config.param_dtype`; block leaves are stacked on a leading depth axis.
    """
    dtype = np.dtype(config.param_dtype)
    global_entries, block_entries = _entries(config, block=False), _entries(config, block=True)
    total = len(global_entries) + config.depth * len(block_entries)
    with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
        flat = {}
        for e in global_entries:
            flat[e.path] = np.ascontiguousarray(e.layout.to_jax(read(e.key)), dtype)
            bar.update()
        for e in block_entries:
            stacked = []
            for i in range(config.depth):
                stacked.append(e.layout.to_jax(read(block_key(i, e.key))).astype(dtype))
                bar.update()
            flat[f"blocks/{e.path}"] = np.stack(stacked)
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_state_dict(
    params: Params, config: SanaConfig, dtype: str | None = None
) -> dict[str, np.ndarray]:
    """The diffusers state dict (NumPy, contiguous) of params; checks the params paths and shapes first."""
    flat = traverse_util.flatten_dict(params, sep="/")
    check_shapes({k: np.shape(v) for k, v in flat.items()}, params_shapes(config), what="params path")
    state = {}
    for e in _entries(config, block=False):
        state[e.key] = e.layout.to_torch(np.asarray(flat[e.path]))
    for e in _entries(config, block=True):
        stacked = np.asarray(flat[f"blocks/{e.path}"])
        for i in range(config.depth):
            state[block_key(i, e.key)] = e.layout.to_torch(stacked[i])
    cast = np.dtype(dtype) if dtype is not None else None
    return {k: np.ascontiguousarray(v, cast) for k, v in state.items()}


# diffusers config.json <-> SanaConfig.

# diffusers' SanaTransformer2DModel defaults, for config.json files written before a field existed.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32,
    "num_layers": 20, "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240, "caption_channels": 2304, "mlp_ratio": 2.5, "dropout": 0.0,
    "attention_bias": False, "sample_size": 32, "patch_size": 1, "norm_elementwise_affine": False,
    "norm_eps": 1e-6, "interpolation_scale": None, "guidance_embeds": False, "qk_norm": None,
    "timestep_scale": 1.0,
}
# diffusers field -> SanaConfig field.
_FIELD_NAMES = {
    "num_layers": "depth", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "num_cross_attention_heads": "cross_num_heads", "cross_attention_head_dim": "cross_head_dim",
    "mlp_ratio": "mlp_ratio", "in_channels": "in_channels", "out_channels": "out_channels",
    "caption_channels": "caption_channels", "patch_size": "patch_size", "sample_size": "sample_size",
    "qk_norm": "qk_norm", "interpolation_scale": "interpolation_scale",
}
# Fields whose other values change the architecture in ways this model does not implement.
_REQUIRED_VALUES = {
    "guidance_embeds": False,  # SANA-Sprint's guidance embedding
    "attention_bias": False,  # biases on the linear-attention q, k, v
    "norm_elementwise_affine": False,  # affine LayerNorms in the blocks
    "norm_eps": 1e-6,
    "timestep_scale": 1.0,
}
DIFFUSERS_CLASS = "SanaTransformer2DModel"


def config_from_diffusers(values: Mapping[str, Any], **overrides: Any) -> SanaConfig:
    """`SanaConfig` of a diffusers `SanaTransformer2DModel` config.json; raises on unsupported fields.

    `overrides` set further `SanaConfig` fields (param_dtype, compute_dtype, ...).
    """
    if values.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(f"config.json _class_name={values['_class_name']!r}: expected {DIFFUSERS_CLASS!r}")
    merged = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in values.items() if not k.startswith("_")}}
    if merged["out_channels"] is None:
        merged["out_channels"] = merged["in_channels"]

    def unsupported(field: str, expected: str) -> ValueError:
        return ValueError(f"unsupported diffusers config field {field}={merged[field]!r}: "
                          f"expected {expected}")

    for field, required in _REQUIRED_VALUES.items():
        if merged[field] != required:
            raise unsupported(field, f"{required!r} (the only value implemented)")
    hidden = merged["num_attention_heads"] * merged["attention_head_dim"]
    if merged["cross_attention_dim"] != hidden:
        raise unsupported("cross_attention_dim", f"num_attention_heads * attention_head_dim = {hidden}")
    if merged["qk_norm"] not in QK_NORMS:
        raise unsupported("qk_norm", f"one of {QK_NORMS}")
    for field in ("num_cross_attention_heads", "cross_attention_head_dim"):
        if merged[field] is None:
            raise unsupported(field, "a positive integer")
    return SanaConfig(**{ours: merged[theirs] for theirs, ours in _FIELD_NAMES.items()}, **overrides)


def config_to_diffusers(config: SanaConfig) -> dict[str, Any]:
    """The diffusers config.json contents of `config`."""
    values = {theirs: getattr(config, ours) for theirs, ours in _FIELD_NAMES.items()}
    values.update(_REQUIRED_VALUES, cross_attention_dim=config.hidden, dropout=0.0)
    return {"_class_name": DIFFUSERS_CLASS, **dict(sorted(values.items()))}


# Native NVlabs checkpoints.

# NVlabs key -> diffusers key, outside the blocks.
NATIVE_GLOBAL_RENAMES = {
    "x_embedder.proj.weight": "patch_embed.proj.weight",
    "x_embedder.proj.bias": "patch_embed.proj.bias",
    "t_embedder.mlp.0.weight": "time_embed.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embed.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embed.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embed.emb.timestep_embedder.linear_2.bias",
    "t_block.1.weight": "time_embed.linear.weight",
    "t_block.1.bias": "time_embed.linear.bias",
    "y_embedder.y_proj.fc1.weight": "caption_projection.linear_1.weight",
    "y_embedder.y_proj.fc1.bias": "caption_projection.linear_1.bias",
    "y_embedder.y_proj.fc2.weight": "caption_projection.linear_2.weight",
    "y_embedder.y_proj.fc2.bias": "caption_projection.linear_2.bias",
    "attention_y_norm.weight": "caption_norm.weight",
    "final_layer.scale_shift_table": "scale_shift_table",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
}
# NVlabs key -> diffusers keys of its equal row blocks, per block ("blocks.{i}." / "transformer_blocks.{i}.").
NATIVE_BLOCK_RENAMES = {
    "scale_shift_table": ("scale_shift_table",),
    "attn.qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "attn.q_norm.weight": ("attn1.norm_q.weight",),
    "attn.k_norm.weight": ("attn1.norm_k.weight",),
    "attn.proj.weight": ("attn1.to_out.0.weight",),
    "attn.proj.bias": ("attn1.to_out.0.bias",),
    "cross_attn.q_linear.weight": ("attn2.to_q.weight",),
    "cross_attn.q_linear.bias": ("attn2.to_q.bias",),
    "cross_attn.kv_linear.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "cross_attn.kv_linear.bias": ("attn2.to_k.bias", "attn2.to_v.bias"),
    "cross_attn.q_norm.weight": ("attn2.norm_q.weight",),
    "cross_attn.k_norm.weight": ("attn2.norm_k.weight",),
    "cross_attn.proj.weight": ("attn2.to_out.0.weight",),
    "cross_attn.proj.bias": ("attn2.to_out.0.bias",),
    "mlp.inverted_conv.conv.weight": ("ff.conv_inverted.weight",),
    "mlp.inverted_conv.conv.bias": ("ff.conv_inverted.bias",),
    "mlp.depth_conv.conv.weight": ("ff.conv_depth.weight",),
    "mlp.depth_conv.conv.bias": ("ff.conv_depth.bias",),
    "mlp.point_conv.conv.weight": ("ff.conv_point.weight",),
}
# Not part of the network: the positional table (recomputed, unused at 512/1024px) and the null caption.
NATIVE_POS_EMBED = "pos_embed"
NATIVE_NULL_CAPTION = "y_embedder.y_embedding"
NATIVE_SELF_HEAD_DIM = 32  # every SANA model


class _Source(NamedTuple):
    """Where a diffusers tensor lives in a native checkpoint: row block `part` of `parts` of `key`."""

    key: str
    part: int
    parts: int


def _native_sources(config: SanaConfig) -> dict[str, _Source]:
    """diffusers key -> its native source, for every key of `config`."""
    expected = diffusers_shapes(config)
    sources = {}
    for native, theirs in NATIVE_GLOBAL_RENAMES.items():
        sources[theirs] = _Source(native, 0, 1)
    for i in range(config.depth):
        for native, parts in NATIVE_BLOCK_RENAMES.items():
            for j, theirs in enumerate(parts):
                sources[block_key(i, theirs)] = _Source(f"blocks.{i}.{native}", j, len(parts))
    return {k: v for k, v in sources.items() if k in expected}


def native_shapes(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """Every native network key of `config` with its PyTorch shape (fused tensors stack row blocks)."""
    expected = diffusers_shapes(config)
    shapes = {}
    for theirs, (native, part, parts) in _native_sources(config).items():
        if part == 0:
            rows, *rest = expected[theirs]
            shapes[native] = (rows * parts, *rest)
    return shapes


def config_from_native(
    shapes: Shapes, *, head_dim: int = NATIVE_SELF_HEAD_DIM, cross_num_heads: int | None = None,
    sample_size: int | None = None, **overrides: Any
) -> SanaConfig:
    """Infers a `SanaConfig` from the tensor shapes of a native checkpoint.

    depth counts `blocks.{i}`; widths, channels and patch size come from shapes; qk_norm from the
    presence of `blocks.0.attn.q_norm.weight`; self-attention heads have `head_dim` 32 as in every
    SANA model. Cross-attention heads are not visible in any shape (only heads x dim = hidden is): give
    `cross_num_heads`, or it is taken from the preset of the same hidden size (16 x 72 for 1152,
    20 x 112 for 2240). sample_size comes from `pos_embed` when stored, else `sample_size`, else 32.
    """
    needed = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.y_proj.fc1.weight",
              "blocks.0.mlp.point_conv.conv.weight")
    for key in needed:
        if key not in shapes:
            raise CheckpointMismatch(f"missing key {key!r}: needed to infer the model config")
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    mlp_hidden = shapes["blocks.0.mlp.point_conv.conv.weight"][1]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} (x_embedder.proj.weight): expected a multiple of "
                         f"the self-attention head_dim={head_dim}")
    if cross_num_heads is None:
        matches = {c.cross_num_heads for c in PRESETS.values() if c.hidden == hidden}
        if len(matches) != 1:
            raise ValueError(f"hidden size {hidden} matches no SANA preset: pass the number of "
                             "cross-attention heads (cross_num_heads / --cross-heads)")
        cross_num_heads = matches.pop()
    if hidden % cross_num_heads:
        raise ValueError(f"cross_num_heads={cross_num_heads}: expected a divisor of the hidden size {hidden}")
    if NATIVE_POS_EMBED in shapes:
        sample_size = math.isqrt(shapes[NATIVE_POS_EMBED][-2]) * patch
    config = SanaConfig(
        depth=depth, num_heads=hidden // head_dim, head_dim=head_dim,
        cross_num_heads=cross_num_heads, cross_head_dim=hidden // cross_num_heads,
        mlp_ratio=mlp_hidden / hidden, in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
        caption_channels=shapes["y_embedder.y_proj.fc1.weight"][1], patch_size=patch,
        sample_size=sample_size or 32,
        qk_norm="rms_norm_across_heads" if "blocks.0.attn.q_norm.weight" in shapes else None, **overrides)
    if config.mlp_hidden != mlp_hidden:
        raise ValueError(f"Mix-FFN width {mlp_hidden} (mlp.point_conv): not int(mlp_ratio * {hidden}) "
                         "for any float mlp_ratio")
    return config


# Files.


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@contextlib.contextmanager
def open_safetensors(folder: str | Path) -> Iterator[tuple[dict[str, tuple[int, ...]], set[str], Callable]]:
    """Lazily opens a diffusers weights folder: one `*.safetensors` file or shards with an index.

    Yields (shapes, dtype names, read) where `read(key)` loads one tensor as a NumPy array.
    """
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: expected one *.safetensors.index.json, "
                         f"found {[p.name for p in indexes]}")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
        if len(files) != 1:
            raise ValueError(f"{folder}: expected one *.safetensors file or an index, found {sorted(files)}")
    with contextlib.ExitStack() as stack:
        handles = {}
        for name in files:
            try:
                handle = stack.enter_context(safe_open(folder / name, framework="np"))
            except SafetensorError as e:
                raise ValueError(f"{folder / name}: not a readable .safetensors file ({e}); expected a complete "
                                 "file (a truncated download?)") from None
            handles.update(dict.fromkeys(handle.keys(), handle))
        shapes = {k: tuple(h.get_slice(k).get_shape()) for k, h in handles.items()}
        dtypes = {h.get_slice(k).get_dtype() for k, h in handles.items()}
        dtypes = {_SAFETENSORS_DTYPES.get(d, d) for d in dtypes}
        yield shapes, dtypes, lambda key: handles[key].get_tensor(key)


def read_diffusers(folder: str | Path, *, dtype: str | None = None, progress: bool = False,
                   **overrides: Any) -> tuple[SanaConfig, Params]:
    """Reads a diffusers `SanaTransformer2DModel` folder (config.json + safetensors) into params.

    dtype: "float32" or "bfloat16"; default bfloat16 when every stored tensor is, else float32.
    Raises `CheckpointMismatch` naming every missing, unexpected or mis-shaped key.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a diffusers transformer folder")
    values = json.loads(config_file.read_text())
    with open_safetensors(folder) as (shapes, dtypes, read):
        config = config_from_diffusers(values, param_dtype=_param_dtype(dtype, dtypes), **overrides)
        check_shapes(shapes, diffusers_shapes(config))
        return config, state_dict_to_params(read, config, progress=progress)


WEIGHTS_NAME = "diffusion_pytorch_model"


def write_diffusers(folder: str | Path, config: SanaConfig, params: Params, *, dtype: str | None = None,
                    max_shard_bytes: int = 10 * 2**30) -> None:
    """Writes params as a diffusers folder that `SanaTransformer2DModel.from_pretrained` loads.

    Tensors above `max_shard_bytes` in total are split into numbered shards with an index.
    """
    folder = Path(folder)
    state = params_to_state_dict(params, config, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_diffusers(config), indent=2) + "\n")
    shards, size = [{}], 0
    for key, value in state.items():
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(state, folder / f"{WEIGHTS_NAME}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard"), start=1):
        name = f"{WEIGHTS_NAME}-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch  # optional dependency, only for .pth files

    if tensor.dtype == torch.bfloat16:
        return tensor.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().cpu().numpy()


def read_sana_pth(
    path: str | Path, *, head_dim: int = NATIVE_SELF_HEAD_DIM, cross_num_heads: int | None = None,
    dtype: str | None = None, progress: bool = False, **overrides: Any
) -> tuple[SanaConfig, Params, np.ndarray | None]:
    """Reads a native NVlabs SANA checkpoint (`{"state_dict": ...}`, loaded with weights_only=True).

    Returns (config, params, null caption): the null caption is `y_embedder.y_embedding` (L, C_text)
    as float32, or None when absent. See `config_from_native` for how the config is inferred.
    """
    import torch  # optional dependency, only for .pth files

    # weights_only: a pickle can run code; mmap: tensors are read from disk as they are converted.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry")
    state = checkpoint["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    config = config_from_native(shapes, head_dim=head_dim, cross_num_heads=cross_num_heads,
                                param_dtype=_param_dtype(dtype, dtypes), **overrides)
    network = {k: v for k, v in shapes.items() if k not in (NATIVE_POS_EMBED, NATIVE_NULL_CAPTION)}
    check_shapes(network, native_shapes(config))
    sources = _native_sources(config)

    def read(key: str) -> np.ndarray:
        native, part, parts = sources[key]
        tensor = _torch_to_numpy(state[native])
        return np.split(tensor, parts)[part]

    params = state_dict_to_params(read, config, progress=progress)
    null_caption = state.get(NATIVE_NULL_CAPTION)
    return config, params, None if null_caption is None else _torch_to_numpy(null_caption.float())


# ----------------------------------------------------------------------------------------------------------
# Whole checkpoint folders, and the command line.

USAGE = """Converts SANA transformer checkpoints between diffusers, native NVlabs and orbax formats.

  python tools/convert.py diffusers-to-orbax SRC DST  # SRC: config.json + one or sharded *.safetensors
  python tools/convert.py orbax-to-diffusers SRC DST  # DST: for SanaTransformer2DModel.from_pretrained
  python tools/convert.py sana-pth-to-orbax SRC.pth DST [--cross-heads N] [--head-dim 32]

The output is written beside DST and renamed into place at the end, so DST is untouched on any failure.
An existing DST is replaced only with --force and only when it holds nothing but what a conversion writes
(never SRC, a folder holding SRC, or other files). A native checkpoint's null caption
(`y_embedder.y_embedding`, the CFG negative of its training) is kept as DST/null_caption.npy.
Any missing, unexpected or mis-shaped key is an error naming the key and both shapes (exit status 1).
"""

NULL_CAPTION_FILE = "null_caption.npy"
# What the conversions write: a sana_jax.checkpoint (+ null caption) or a diffusers folder, whose weight
# files all start with WEIGHTS_NAME.
OUTPUT_NAMES = (sana_checkpoint.PARAMS_DIR, sana_checkpoint.CONFIG_FILE, sana_checkpoint.METADATA_FILE,
                NULL_CAPTION_FILE, "config.json")


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuses SRC itself or a folder holding it as DST, and an existing DST without --force."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST {dst} is the source: choose another DST")
    if dst.resolve() in src.resolve().parents:
        raise ValueError(f"DST {dst} is a parent of SRC {src}: choose another DST")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")


def check_replaceable(dst: Path) -> None:
    """Refuses to replace a DST that holds anything a conversion does not write."""
    if not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not an earlier conversion's output: choose another DST")
    foreign = sorted(p.name for p in dst.iterdir()
                     if p.name not in OUTPUT_NAMES and not p.name.startswith(WEIGHTS_NAME))
    if foreign:
        raise FileExistsError(f"{dst} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} that "
                              "convert did not write; --force replaces only an earlier output: choose another DST")


def diffusers_to_orbax(src: Path, dst: Path, *, dtype: str | None = None) -> None:
    """A diffusers transformer folder -> a `sana_jax.checkpoint` at `dst`."""
    config, params = read_diffusers(src, dtype=dtype, progress=True)
    with sana_checkpoint.staged(dst, check_replaceable) as out:
        sana_checkpoint.save(out, config, params)


def orbax_to_diffusers(src: Path, dst: Path, *, dtype: str | None = None) -> None:
    """A `sana_jax.checkpoint` -> a diffusers transformer folder at `dst`."""
    config, params = sana_checkpoint.load(src)
    with sana_checkpoint.staged(dst, check_replaceable) as out:
        write_diffusers(out, config, params, dtype=dtype)


def sana_pth_to_orbax(src: Path, dst: Path, *, dtype: str | None = None, head_dim: int = NATIVE_SELF_HEAD_DIM,
                      cross_heads: int | None = None) -> None:
    """A native NVlabs .pth file -> a `sana_jax.checkpoint` at `dst`, with its null caption if it has one."""
    config, params, null_caption = read_sana_pth(src, head_dim=head_dim, cross_num_heads=cross_heads, dtype=dtype,
                                                 progress=True)
    with sana_checkpoint.staged(dst, check_replaceable) as out:
        sana_checkpoint.save(out, config, params)
        if null_caption is not None:
            np.save(out / NULL_CAPTION_FILE, null_caption)


# The commands: name -> (conversion, what SRC is).
COMMANDS: dict[str, tuple[Callable[..., None], str]] = {
    "diffusers-to-orbax": (diffusers_to_orbax, "diffusers transformer folder"),
    "orbax-to-diffusers": (orbax_to_diffusers, "orbax checkpoint directory"),
    "sana-pth-to-orbax": (sana_pth_to_orbax, "native NVlabs .pth file"),
}
# Flags that only sana-pth-to-orbax takes.
NATIVE_FLAGS = ("head-dim", "cross-heads")


def flag_values() -> flags.FlagValues:
    """The command line's flags, on their own `FlagValues`; COMMAND SRC DST are positional."""
    values = flags.FlagValues()
    flags.DEFINE_enum("dtype", None, PARAM_DTYPES,
                      "cast the weights (default: keep bfloat16 if all are, else float32)", flag_values=values)
    flags.DEFINE_boolean("force", False, "replace an existing DST that holds an earlier conversion's output",
                         flag_values=values)
    flags.DEFINE_integer("head-dim", NATIVE_SELF_HEAD_DIM, "sana-pth-to-orbax: self-attention head dim "
                         f"(default: {NATIVE_SELF_HEAD_DIM}, every SANA model)", flag_values=values)
    flags.DEFINE_integer("cross-heads", None, "sana-pth-to-orbax: cross-attention heads (default: from the preset "
                         "of the same width)", flag_values=values)
    return values


def _help_text() -> str:
    """USAGE and one line per command."""
    commands = "\n".join(f"  {name:<20} {src} -> {name.rsplit('-', 1)[1]}"
                          for name, (_, src) in COMMANDS.items())
    return f"{USAGE}\ncommands (COMMAND SRC DST; DST is written only on success):\n{commands}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one conversion (`argv`: COMMAND SRC DST [flags], None: `sys.argv[1:]`); returns the exit status (1
    with a one-line error on stderr on failure). A usage mistake exits with status 2 and one line."""
    values = flag_values()
    positional = cli.parse(values, argv, _help_text(), positional=True)
    if not positional:
        cli.fail(f"expected COMMAND SRC DST with COMMAND one of <{'|'.join(COMMANDS)}>")
    try:
        command = flags.EnumParser(list(COMMANDS)).parse(positional[0])
    except ValueError as error:
        cli.fail(f"COMMAND={positional[0]!r}: {error}")
    if len(positional) != 3:
        cli.fail(f"{command} expects SRC DST, got {positional[1:]}")
    misplaced = [f"--{name}" for name in NATIVE_FLAGS if values[name].present]
    if misplaced and command != "sana-pth-to-orbax":
        cli.fail(f"{', '.join(misplaced)}: a flag of sana-pth-to-orbax only, not of {command}")
    src, dst = (Path(path) for path in positional[1:])
    options = ({name.replace("-", "_"): values[name].value for name in NATIVE_FLAGS}
               if command == "sana-pth-to-orbax" else {})
    try:
        check_destination(src, dst, values["force"].value)
        COMMANDS[command][0](src, dst, dtype=values["dtype"].value, **options)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

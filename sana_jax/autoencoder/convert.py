"""diffusers `AutoencoderDC` weights -> DC-AE parameters.

Parameter paths map to state-dict keys by rule: module names `name_i_j` become `name.i.j`; a conv or
dense `kernel` is the transposed `weight` ((kh, kw, in, out) <- (out, in, kh, kw); (in, out) <- (out, in));
a norm `scale` is `weight`; frozen BatchNorm `mean` / `var` are `running_mean` / `running_var`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax

from sana_jax.autoencoder import dc_ae
from sana_jax.autoencoder.config import DCAEConfig

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
# Buffers the reference keeps that inference does not use.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def _state_dict_key(path: tuple[str, ...]) -> str:
    modules = [re.sub(r"_(\d+)", r".\1", name) for name in path[:-1]]
    return ".".join([*modules, _LEAF_NAMES[path[-1]]])


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers shape of a parameter with this flax shape."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _to_flax(value: np.ndarray) -> np.ndarray:
    """The flax layout of a diffusers parameter (the inverse of `_torch_layout`)."""
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # A torch tensor; bfloat16 has no NumPy counterpart.
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


@functools.lru_cache(maxsize=8)
def _expected_leaves(config: DCAEConfig) -> tuple[list, jax.tree_util.PyTreeDef]:
    """(path, ShapeDtypeStruct) pairs and the tree structure of the parameters of `config`."""
    return jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(functools.partial(dc_ae.init_params, config), jax.random.key(0)))


def params_from_state_dict(state_dict: Mapping[str, Any], config: DCAEConfig) -> dict:
    """Converts a diffusers `AutoencoderDC` state dict (torch tensors or arrays) to float32 parameters.

    Raises:
      ValueError naming every missing, unexpected or mis-shaped key (with both shapes).
    """
    flat, treedef = _expected_leaves(config)
    leaves, problems, used = [], [], set()
    for path, spec in flat:
        names = tuple(entry.key for entry in path)
        key = _state_dict_key(names)
        want = _torch_layout(spec.shape)
        if key not in state_dict:
            problems.append(f"missing key {key} (expected shape {want})")
            leaves.append(None)
            continue
        used.add(key)
        value = _to_numpy(state_dict[key])
        if value.shape != want:
            problems.append(f"key {key} has shape {value.shape}, expected {want}")
        leaves.append(_to_flax(value))
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    problems += [f"unexpected key {k} of shape {tuple(state_dict[k].shape)}" for k in unexpected]
    if problems:
        raise ValueError("state dict does not match the DC-AE config:\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf) for leaf in leaves])


def load_diffusers(path: str | pathlib.Path) -> tuple[DCAEConfig, dict]:
    """Reads a diffusers `AutoencoderDC` folder (config.json and one or more *.safetensors files)."""
    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a diffusers AutoencoderDC folder")
    config = DCAEConfig.from_diffusers_config(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"no *.safetensors weights in {folder}; it holds {found}")
    state_dict = {}
    for file in files:
        state_dict.update(safetensors.flax.load_file(file))
    return config, params_from_state_dict(state_dict, config)

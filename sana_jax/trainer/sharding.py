"""The device mesh (data x fsdp) and the placement of params and batches on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sana_jax.model import LOGICAL_AXIS_RULES, SanaConfig, logical_axes

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves -1 (fill the rest) in (data, fsdp) against the device count; errors name the bad value."""
    for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ValueError(f"{name}={value}: expected a positive size or -1 (fill the rest)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: at most one axis can fill the rest")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide by mesh size {known}")
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data * fsdp != num_devices:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; {num_devices} present")
    return data, fsdp


def make_mesh(data: int, fsdp: int) -> Mesh:
    """A (data, fsdp) mesh over all devices, with GSPMD-style (Auto) axes."""
    shape = mesh_shape(data, fsdp, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    rules = dict(LOGICAL_AXIS_RULES)
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axis = rules.get(name)
        # A dimension the mesh axis does not divide stays replicated.
        spec.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*spec)


def param_shardings(config: SanaConfig, params_shape, mesh: Mesh):
    """NamedShardings for a params tree (or its ShapeDtypeStructs): FSDP over the hidden width."""
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _mesh_spec(spec, leaf.shape, mesh)),
                        logical_axes(config), params_shape,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Stacked batches (K, B, ...) are split over every mesh axis along the batch dimension B."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def global_batches(local_batches: Sequence[Mapping[str, np.ndarray]], mesh: Mesh,
                   keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """K batches of this process's rows -> global arrays (K, B, ...) sharded over the batch axes.

    `keys`: the entries to keep (default: all of the first batch's).
    """
    sharding = batch_sharding(mesh)
    keys = list(local_batches[0]) if keys is None else keys
    return {k: jax.make_array_from_process_local_data(sharding, np.stack([b[k] for b in local_batches]))
            for k in keys}

"""Makes an op that is independent per (batch, head) work under `jax.vmap` and batch/head sharding.

Custom kernels (jax_triton calls) have no batching rule and, to XLA's partitioner, are opaque custom
calls that it runs replicated, gathering sharded inputs first. `per_head` wraps such an op:

- `jax.vmap`: a `jax.custom_batching.custom_vmap` rule folds the mapped axis into the batch axis
  ((V, B, ...) -> (V * B, ...), a free reshape) and calls the op once.
- sharding: a `custom_partitioning` rule keeps whatever mesh axes shard the batch and head axes of
  the first argument, replicates every other axis, and runs the op on each device's shard, so a
  batch- or head-sharded input is never gathered. Both partitioners are served: a Shardy
  sharding rule and the GSPMD callbacks.

Layouts name the axes of each array, one letter per axis: "b" is the batch axis and must come
first, "h" the head axis; every other letter is an axis the op needs whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def per_head(op: Callable[..., tuple[jax.Array, ...]], in_layouts: Sequence[str],
             out_layouts: Sequence[str]) -> Callable[..., tuple[jax.Array, ...]]:
    """Wraps `op(*arrays) -> tuple of arrays` (layouts as described above) for vmap and sharding."""
    for layout in (*in_layouts, *out_layouts):
        if layout[0] != "b" or "h" not in layout or len(set(layout)) != len(layout):
            raise ValueError(f"layout {layout!r}: expected distinct axis letters, 'b' first and an 'h'")
    return _fold_vmap(_partition_over_batch_and_heads(op, in_layouts, out_layouts))


def _fold_vmap(op: Callable[..., tuple[jax.Array, ...]]) -> Callable[..., tuple[jax.Array, ...]]:
    folded = jax.custom_batching.custom_vmap(op)

    @folded.def_vmap
    def _rule(axis_size, in_batched, *args):
        # jax calls this rule outside the caller's mesh context; inputs typed with Explicit mesh axes carry the mesh.
        meshes = [jax.typeof(x).sharding.mesh for x in args]
        with jax.sharding.use_abstract_mesh(next((m for m in meshes if not m.empty), meshes[0])):
            args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                    for x, batched in zip(args, in_batched, strict=True)]
            outs = folded(*(x.reshape(-1, *x.shape[2:]) for x in args))
            return tuple(y.reshape(axis_size, -1, *y.shape[1:]) for y in outs), (True,) * len(outs)

    return folded


def _partition_over_batch_and_heads(op, in_layouts, out_layouts):
    partitioned = custom_partitioning(op)

    def shardings(mesh, arg_shapes):
        """Per-array shardings: the first argument's batch and head mesh axes, the rest replicated."""
        spec = tuple(arg_shapes[0].sharding.spec)
        spec += (None,) * (len(in_layouts[0]) - len(spec))
        kept = {"b": spec[in_layouts[0].index("b")], "h": spec[in_layouts[0].index("h")]}

        def sharding(layout):
            return NamedSharding(mesh, PartitionSpec(*(kept.get(axis) for axis in layout)))

        return tuple(map(sharding, in_layouts)), tuple(map(sharding, out_layouts))

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        arg_shardings, result_shardings = shardings(mesh, arg_shapes)
        return mesh, op, result_shardings, arg_shardings

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(mesh, arg_shapes)[1]

    # Shardy numbers factors by first appearance and wants the special ones in that order.
    letters = dict.fromkeys(axis for layout in (*in_layouts, *out_layouts) for axis in layout)
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=f"{', '.join(map(' '.join, in_layouts))} -> {', '.join(map(' '.join, out_layouts))}",
        need_replication_factors=tuple(x for x in letters if x not in "bh"))
    return partitioned

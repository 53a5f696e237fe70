"""Which parameters CAME factors, and over which axes.

A factoring rule maps a leaf's key path and shape to a `Factoring`. A factored leaf keeps row and
column second-moment statistics of a (rows, cols) matrix (all other axes index independent matrices);
any other leaf keeps full second moments and takes the first moment as its step, as SANA does for
vectors and depthwise 3x3 kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax

KeyPath = tuple[jax.tree_util.KeyEntry, ...]


@dataclasses.dataclass(frozen=True)
class Factoring:
    """How CAME treats one parameter.

    batch_ndim: leading axes that index independent tensors (a stacked depth axis); the update's RMS
      clip and the 8-bit size threshold apply per index of these axes.
    axes: (row_axis, col_axis), row_axis < col_axis, of the factored matrix; None keeps full moments.
    """

    batch_ndim: int = 0
    axes: tuple[int, int] | None = None

    def check(self, shape: tuple[int, ...], where: str):
        """Raises ValueError naming `where` when this factoring does not fit an array of `shape`."""
        if not 0 <= self.batch_ndim <= len(shape):
            raise ValueError(f"{where}: batch_ndim={self.batch_ndim} does not fit shape {shape}")
        if self.axes is not None:
            rows, cols = self.axes
            if not self.batch_ndim <= rows < cols < len(shape):
                raise ValueError(f"{where}: factored axes {self.axes} of shape {shape} must satisfy "
                                 f"batch_ndim ({self.batch_ndim}) <= row_axis < col_axis < ndim")

    def layer_size(self, shape: tuple[int, ...]) -> int:
        """Elements of one independent tensor: the product of the non-batch axes."""
        return math.prod(shape[self.batch_ndim:])


FactoringRule = Callable[[KeyPath, tuple[int, ...]], Factoring]


def _key_names(path: KeyPath) -> list[str]:
    names = (getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))) for entry in path)
    return [str(name) for name in names]


def sana_factoring(path: KeyPath, shape: tuple[int, ...], *,
                   stacked_keys: Sequence[str] = ("blocks",)) -> Factoring:
    """SANA's rule: factor 2-D weights and 1x1 convolutions, per stacked layer.

    Leaves under a key in `stacked_keys` carry one leading depth axis of independent layers. A layer is
    factored when, with its size-1 axes dropped, it is a matrix: dense kernels (in, out), 1x1 convs
    (1, 1, in, out), modulation tables (6, D). Vectors and depthwise kernels (3, 3, C) are not.
    """
    batch_ndim = 1 if shape and any(name in stacked_keys for name in _key_names(path)) else 0
    matrix_axes = [axis for axis in range(batch_ndim, len(shape)) if shape[axis] != 1]
    return Factoring(batch_ndim, tuple(matrix_axes) if len(matrix_axes) == 2 else None)


def came_pytorch_factoring(path: KeyPath, shape: tuple[int, ...]) -> Factoring:
    """came-pytorch's rule: every tensor with ndim >= 2 is factored over its last two axes."""
    del path
    return Factoring(0, (len(shape) - 2, len(shape) - 1) if len(shape) >= 2 else None)

"""Bytes held by an optimizer state."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def state_bytes(state: Any) -> int:
    """Total bytes of the arrays in `state`; also takes `jax.eval_shape` output (ShapeDtypeStructs)."""
    return sum(math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))

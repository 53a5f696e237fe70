"""The text encoder interface: what the pipelines and samplers use from Gemma-2 (`GemmaTextEncoder`).

`encode_text(prompts) -> (features (B, L, C) float32, mask (B, L) int32 of 0/1)`, right-padded to
`max_length` tokens, with `feature_dim` = C.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    """What the pipelines, tools and samplers need from a text encoder."""

    @property
    def max_length(self) -> int: ...

    @property
    def feature_dim(self) -> int: ...

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

"""`WordTextEncoder`: a small deterministic word-level text encoder for the shapes domain."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sana_jax.data import shapes


@dataclasses.dataclass(frozen=True)
class WordTextEncoder:
    """Fixed random word embeddings with light positional mixing.

    Prompts are lowercased and split into words, punctuation dropped (`shapes.prompt_words`). Token i gets
    `e(w_i) + 0.5 e(w_{i-1}) + 0.25 p_i`, divided by the norm of those weights so entries have about
    unit variance; e and p are Gaussian tables drawn from `seed` (identical in every process) and the
    previous-word term binds a colour or number to the noun after it. Padding positions are zero
    with mask 0, so the null prompt "" is all zeros with an all-zero mask.
    """

    vocabulary: tuple[str, ...] = shapes.VOCABULARY
    max_length: int = 16
    feature_dim: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.max_length <= 0 or self.feature_dim <= 0:
            raise ValueError(f"max_length={self.max_length} and feature_dim={self.feature_dim}: "
                             "expected positive integers")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("the vocabulary has repeated words")
        rng = np.random.default_rng(self.seed)
        # Derived tables; not fields, so equality and `dataclasses.asdict` see the configuration only.
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.vocabulary)})
        object.__setattr__(self, "_words",
                           rng.standard_normal((len(self.vocabulary), self.feature_dim)).astype(np.float32))
        object.__setattr__(self, "_positions",
                           rng.standard_normal((self.max_length, self.feature_dim)).astype(np.float32))

    def tokenize(self, prompt: str) -> list[int]:
        """Word ids of `prompt`; a clear error for unknown words and prompts that are too long."""
        words = shapes.prompt_words(prompt)
        unknown = [w for w in words if w not in self._ids]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in prompt {prompt!r}; the vocabulary is "
                             f"{sorted(self._ids)}")
        if len(words) > self.max_length:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_length} fit")
        return [self._ids[w] for w in words]

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (features (B, max_length, feature_dim) float32, mask (B, max_length) int32)."""
        if isinstance(prompts, str):
            raise TypeError(f"expected a sequence of prompts, got the string {prompts!r}")
        features = np.zeros((len(prompts), self.max_length, self.feature_dim), np.float32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for b, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            n = len(ids)
            words = self._words[ids]
            mixed = words + 0.25 * self._positions[:n]
            mixed[1:] += 0.5 * words[:-1]
            features[b, :n] = mixed / np.float32(np.sqrt(1.0 + 0.25 + 0.0625))
            mask[b, :n] = 1
        return features, mask

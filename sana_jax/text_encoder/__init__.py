"""Text encoders: the `TextEncoder` interface, Gemma-2 (SANA's) and a word-level one for the shapes domain.

Modules: `protocol` (the interface), `gemma` (`GemmaTextEncoder`: SANA's Gemma-2 prompt features),
`gemma2` (Gemma-2's decoder in JAX), `word` (`WordTextEncoder`).
"""

from sana_jax.text_encoder.gemma import (
    BACKENDS,
    COMPLEX_HUMAN_INSTRUCTION,
    DTYPES,
    GemmaTextEncoder,
    kept_positions,
    preprocess,
)
from sana_jax.text_encoder.gemma2 import Gemma2Spec, gemma2_forward, gemma2_params
from sana_jax.text_encoder.protocol import TextEncoder
from sana_jax.text_encoder.word import WordTextEncoder

__all__ = [
    "BACKENDS",
    "COMPLEX_HUMAN_INSTRUCTION",
    "DTYPES",
    "Gemma2Spec",
    "GemmaTextEncoder",
    "TextEncoder",
    "WordTextEncoder",
    "gemma2_forward",
    "gemma2_params",
    "kept_positions",
    "preprocess",
]

"""Gemma-2 text features for SANA, prepared as diffusers' `SanaPipeline` prepares them.

A prompt is lowercased and stripped, prefixed with the "complex human instruction", tokenized with right
padding to `len(instruction tokens) + max_length - 2` tokens and encoded; features and mask then keep BOS
plus the last `max_length - 1` positions. The null caption "" (the negative prompt of classifier-free
guidance) is encoded without the instruction, padded to `max_length`, and so is any prompt encoded with
`encode_text(prompts, instruction=False)` (diffusers' negative prompts). Features are Gemma-2's last hidden
state after its final norm.

Two backends run the same Gemma-2: "torch" (Hugging Face transformers) and "jax" (`gemma2_forward` of
`sana_jax.text_encoder.gemma2`, a JAX port reading the checkpoint's safetensors directly, so sampling
needs no torch). transformers and torch are optional dependencies, imported only when an encoder is
built.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from sana_jax.text_encoder.gemma2 import Gemma2Spec, gemma2_forward, gemma2_params

# diffusers' `SanaPipeline.__call__` default, joined with "\n" and prepended to every prompt.
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions "
    "suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
    "spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
    "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring "
    "glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus "
    "passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any "
    "additional commentary or evaluations:",
    "User Prompt: ",
)

BACKENDS = ("torch", "jax", "auto")
DTYPES = ("float32", "bfloat16")


def preprocess(prompt: str) -> str:
    """SANA's caption clean-up without `clean_caption`: lowercase and strip."""
    return prompt.lower().strip()


def kept_positions(num_tokens: int, max_length: int) -> np.ndarray:
    """Indices of BOS and the last `max_length - 1` of `num_tokens` positions (SANA paper, section 3.1)."""
    if num_tokens < max_length:
        raise ValueError(f"num_tokens={num_tokens}: expected at least max_length={max_length}")
    return np.concatenate([[0], np.arange(num_tokens - max_length + 1, num_tokens)])


_gemma2_forward_jit = jax.jit(gemma2_forward, static_argnums=1)

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids (B, T), mask (B, T)) -> features (B, T, C)
_Key = tuple[bool, str]  # A cache key: (encoded with the instruction prefix, preprocessed prompt).


def _local_dir(name_or_path: str) -> str:
    """A local checkpoint folder: the path itself, or a hub snapshot of the files the JAX backend reads."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])


def _torch_forward(name_or_path: str, dtype: str, device: str) -> tuple[Forward, int]:
    import torch
    from transformers import AutoModel

    # Gemma-2 needs eager attention: SDPA would drop the attention-logit soft-capping.
    model = AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype), attn_implementation="eager")
    model = model.to(device).eval()

    def forward(ids, mask):
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids).to(device),
                        attention_mask=torch.from_numpy(mask).to(device))
        return out.last_hidden_state.float().cpu().numpy()

    return forward, model.config.hidden_size


def _jax_forward(name_or_path: str, dtype: str, batch_size: int) -> tuple[Forward, int]:
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = _local_dir(name_or_path)
    spec = Gemma2Spec.from_hf(AutoConfig.from_pretrained(folder))
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder!r}")
    tensors = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    params = gemma2_params(tensors, spec, dtype)
    del tensors

    def forward(ids, mask):
        # Short batches are padded with copies of their last row so that one compiled shape serves all.
        count = len(ids)
        pad = ((0, batch_size - count), (0, 0))
        features = _gemma2_forward_jit(params, spec, np.pad(ids, pad, mode="edge"),
                                       np.pad(mask, pad, mode="edge"))
        return np.asarray(features[:count], dtype=np.float32)

    return forward, spec.hidden


def _auto_backend(folder: Path) -> str:
    """"jax" for a local folder holding a Gemma-2 in safetensors (the JAX port reads those), else "torch"."""
    config_file = folder / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    return "jax" if model_type == "gemma2" and any(folder.glob("*.safetensors")) else "torch"


class GemmaTextEncoder:
    """SANA's Gemma-2 prompt features, batched and cached by prompt and by whether the instruction prefix was
    used (least recently used evicted first).

    Implements `sana_jax.text_encoder.TextEncoder`.

    Attributes:
      max_length: L, text positions per prompt (300 for SANA).
      feature_dim: C, Gemma's hidden width (2304 for Gemma-2-2B).
    """

    def __init__(self, name_or_path: str, *, tokenizer_path: str | None = None, backend: str = "torch",
                 max_length: int = 300, instruction: Sequence[str] = COMPLEX_HUMAN_INSTRUCTION,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 8, cache_size: int = 1024):
        """Loads the tokenizer and model from local folders or hub ids.

        Args:
          name_or_path: a transformers checkpoint of Gemma-2 (e.g. "Efficient-Large-Model/gemma-2-2b-it").
          tokenizer_path: where the tokenizer is, when not beside the model (e.g. a diffusers pipeline's
            tokenizer/ folder); default `name_or_path`.
          backend: "torch" (transformers), "jax" (`gemma2_forward` on the default JAX device), or "auto": "jax"
            when `name_or_path` is a local folder holding a Gemma-2 in safetensors, else "torch".
          max_length: L, kept positions per prompt.
          instruction: lines of the prefix, joined with newlines; empty for plain prompts.
          dtype: "float32" or "bfloat16" for the model; features are returned as float32.
          device: torch device of the "torch" backend.
          batch_size: prompts per forward pass.
          cache_size: how many prompts' features to keep.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: expected at least 2 (BOS and one token)")
        from transformers import AutoTokenizer

        if backend == "auto":
            backend = _auto_backend(Path(name_or_path))

        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path if tokenizer_path is None else tokenizer_path)
        self._tokenizer.padding_side = "right"
        if backend == "torch":
            self._forward, self.feature_dim = _torch_forward(name_or_path, dtype, device)
        else:
            self._forward, self.feature_dim = _jax_forward(name_or_path, dtype, batch_size)
        self.max_length = max_length
        self._prefix = "\n".join(instruction)
        self._prompt_tokens = (len(self._tokenizer.encode(self._prefix)) + max_length - 2 if self._prefix
                               else max_length)
        self._batch_size = batch_size
        self._cache_size = cache_size
        # Keyed by (prefixed, preprocessed prompt); the null caption is never prefixed.
        self._cache: collections.OrderedDict[_Key, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()  # data pipelines encode from several threads

    def encode_text(self, prompts: Sequence[str], instruction: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, L, C) float32 and mask (B, L) int32 for B prompts ("" is the null caption).

        With `instruction=False` the prompts are encoded as the null caption is, without the instruction
        prefix and padded to `max_length` (diffusers' `complex_human_instruction=False`, how it encodes
        negative prompts).
        """
        if isinstance(prompts, str):
            raise TypeError(f"prompts={prompts!r}: expected a list of strings, not one string")
        prefixed = bool(instruction and self._prefix)
        keys = [(prefixed and bool(text), text) for text in map(preprocess, prompts)]
        found = {}
        with self._lock:
            for key in dict.fromkeys(keys):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
            missing = [key for key in dict.fromkeys(keys) if key not in found]
            # Prefixed and plain texts have different token lengths: each kind is encoded on its own.
            fresh = (self._encode_uncached([key for key in missing if key[0]])
                     | self._encode_uncached([key for key in missing if not key[0]]))
            for key, entry in fresh.items():
                self._cache[key] = entry
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        found |= fresh
        features = np.zeros((len(keys), self.max_length, self.feature_dim), np.float32)
        mask = np.zeros((len(keys), self.max_length), np.int32)
        for i, key in enumerate(keys):
            features[i], mask[i] = found[key]
        return features, mask

    def _encode_uncached(self, keys: list[_Key]) -> dict[_Key, tuple[np.ndarray, np.ndarray]]:
        """Encodes cache keys (prefixed, preprocessed text) that all are, or all are not, prefixed."""
        if not keys:
            return {}
        if keys[0][0]:
            inputs, num_tokens = [self._prefix + text for _, text in keys], self._prompt_tokens
        else:
            inputs, num_tokens = [text for _, text in keys], self.max_length
        keep = kept_positions(num_tokens, self.max_length)
        starts = range(0, len(inputs), self._batch_size)
        out = {}
        for start in tqdm(starts, desc="text features", disable=len(starts) <= 1):
            chunk = inputs[start:start + self._batch_size]
            tokens = self._tokenizer(chunk, padding="max_length", max_length=num_tokens, truncation=True,
                                     add_special_tokens=True, return_tensors="np")
            ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
            features = self._forward(ids, mask)[:, keep]
            for i, key in enumerate(keys[start:start + self._batch_size]):
                out[key] = (features[i], mask[i, keep].astype(np.int32))
        return out

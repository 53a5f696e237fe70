"""Gemma-2 text features for SANA, prepared as diffusers' `SanaPipeline` prepares them.

A prompt is lowercased and stripped, prefixed with the "complex human instruction", tokenized with right
padding to `len(instruction tokens) + max_length - 2` tokens and encoded; features and mask then keep BOS
plus the last `max_length - 1` positions. The null caption "" (the negative prompt of classifier-free
guidance) is encoded without the instruction, padded to `max_length`, and so is any prompt encoded with
`encode_text(prompts, instruction=False)` (diffusers' negative prompts). Features are Gemma-2's last hidden
state after its final norm.

Two backends run the same Gemma-2: "torch" (Hugging Face transformers) and "jax" (`gemma2_forward`, a JAX
port reading the checkpoint's safetensors directly, so sampling needs no torch). transformers and torch
are optional dependencies, imported only when an encoder is built.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

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

BACKENDS = ("torch", "jax")
DTYPES = ("float32", "bfloat16")


def preprocess(prompt: str) -> str:
    """SANA's caption clean-up without `clean_caption`: lowercase and strip."""
    return prompt.lower().strip()


def kept_positions(num_tokens: int, max_length: int) -> np.ndarray:
    """Indices of BOS and the last `max_length - 1` of `num_tokens` positions (SANA paper, section 3.1)."""
    if num_tokens < max_length:
        raise ValueError(f"num_tokens={num_tokens}: expected at least max_length={max_length}")
    return np.concatenate([[0], np.arange(num_tokens - max_length + 1, num_tokens)])


# ----------------------------------------------------------------------------------------------------------
# Gemma-2 in JAX.


@dataclasses.dataclass(frozen=True)
class Gemma2Spec:
    """Gemma-2 decoder shape and numerics (the fields of a transformers `Gemma2Config` that matter here)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    sliding_layers: tuple[bool, ...]  # Per layer: sliding-window (True) or full causal attention.
    attn_logit_softcapping: float | None
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_hf(cls, config: Any) -> Gemma2Spec:
        """From a transformers `Gemma2Config`."""
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            sliding_window=config.sliding_window,
            sliding_layers=tuple(t == "sliding_attention" for t in config.layer_types),
            attn_logit_softcapping=config.attn_logit_softcapping,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(config.rope_parameters["rope_theta"]),
        )


_LAYER_KEYS = {  # params["layers"] name -> transformers name under `layers.{i}.`; linear weights transposed.
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "pre_ffw_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
}


def gemma2_params(tensors: Mapping[str, Any], spec: Gemma2Spec, dtype: str = "float32") -> dict[str, Any]:
    """Converts a transformers Gemma-2 state dict (`Gemma2Model` or `Gemma2ForCausalLM` keys) to JAX params.

    Returns {"embed": (V, D), "final_norm": (D,), "layers": {name: (num_layers, ...)}} with linear kernels
    as (in, out); the language-model head is dropped.
    """
    tensors = {k.removeprefix("model."): v for k, v in tensors.items() if not k.startswith("lm_head.")}
    expected = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{name}" for i in range(spec.num_layers) for name in _LAYER_KEYS.values()}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"Gemma-2 weights do not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    cast = lambda x: jnp.asarray(x, dtype=dtype)
    layers = {}
    for name, key in _LAYER_KEYS.items():
        stacked = jnp.stack([cast(tensors[f"layers.{i}.{key}"]) for i in range(spec.num_layers)])
        layers[name] = stacked if name.endswith("norm") else jnp.swapaxes(stacked, 1, 2)
    return {"embed": cast(tensors["embed_tokens.weight"]), "final_norm": cast(tensors["norm.weight"]),
            "layers": layers}


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm `x / rms(x) * (1 + w)`, computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def _rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on (B, T, heads, d) with the half-split layout of transformers."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[:, None].astype(jnp.float32) * inv_freq  # (T, d/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _decoder_layer(spec: Gemma2Spec, x: jax.Array, layer: dict[str, jax.Array], bias: jax.Array) -> jax.Array:
    """One Gemma-2 block on x (B, T, D) with an additive attention bias (B, 1, 1, T, T)."""
    b, t, _ = x.shape
    groups = spec.num_heads // spec.num_kv_heads
    positions = jnp.arange(t)

    h = _rms_norm(x, layer["input_norm"], spec.rms_norm_eps)
    q = _rotate((h @ layer["q"]).reshape(b, t, spec.num_heads, spec.head_dim), positions, spec.rope_theta)
    k = _rotate((h @ layer["k"]).reshape(b, t, spec.num_kv_heads, spec.head_dim), positions, spec.rope_theta)
    v = (h @ layer["v"]).reshape(b, t, spec.num_kv_heads, spec.head_dim)
    q = q.reshape(b, t, spec.num_kv_heads, groups, spec.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * spec.query_pre_attn_scalar ** -0.5
    if spec.attn_logit_softcapping is not None:
        logits = jnp.tanh(logits / spec.attn_logit_softcapping) * spec.attn_logit_softcapping
    weights = jax.nn.softmax((logits + bias).astype(jnp.float32), axis=-1).astype(x.dtype)
    attended = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, t, -1)
    x = x + _rms_norm(attended @ layer["o"], layer["post_attn_norm"], spec.rms_norm_eps)

    h = _rms_norm(x, layer["pre_ffw_norm"], spec.rms_norm_eps)
    h = (jax.nn.gelu(h @ layer["gate"], approximate=True) * (h @ layer["up"])) @ layer["down"]
    return x + _rms_norm(h, layer["post_ffw_norm"], spec.rms_norm_eps)


def gemma2_forward(params: dict[str, Any], spec: Gemma2Spec, input_ids: jax.Array,
                   mask: jax.Array) -> jax.Array:
    """Gemma-2's last hidden state (after the final norm) as transformers' eager attention computes it.

    Args:
      params: from `gemma2_params`.
      spec: the model's `Gemma2Spec` (static under jit).
      input_ids: (B, T) int token ids.
      mask: (B, T) 0/1 padding mask.

    Returns:
      (B, T, D) hidden states in the params' dtype.
    """
    embed = params["embed"]
    x = embed[input_ids] * jnp.asarray(spec.hidden ** 0.5, embed.dtype)
    t = input_ids.shape[1]
    query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = (key <= query) & (mask[:, None, None, None, :] > 0)  # (B, 1, 1, T, T): kv heads, groups.
    in_window = query - key < spec.sliding_window
    # Blocked positions get the dtype's lowest value, added (transformers' eager mask), not -inf.
    lowest = jnp.finfo(embed.dtype).min
    bias_full = jnp.where(allowed, 0.0, lowest).astype(embed.dtype)
    bias_sliding = jnp.where(allowed & in_window, 0.0, lowest).astype(embed.dtype)

    def step(x, scanned):
        layer, sliding = scanned
        return _decoder_layer(spec, x, layer, jnp.where(sliding, bias_sliding, bias_full)), None

    x, _ = jax.lax.scan(step, x, (params["layers"], jnp.asarray(spec.sliding_layers)))
    return _rms_norm(x, params["final_norm"], spec.rms_norm_eps)


_gemma2_forward_jit = jax.jit(gemma2_forward, static_argnums=1)

# ----------------------------------------------------------------------------------------------------------
# The SANA text encoder.

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


class GemmaTextEncoder:
    """SANA's Gemma-2 prompt features, batched and cached by prompt and by whether the instruction prefix was
    used (least recently used evicted first).

    Implements `sana_jax.data.text_encoder.TextEncoder`.

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
          backend: "torch" (transformers) or "jax" (`gemma2_forward` on the default JAX device).
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

"""Gemma-2's decoder in JAX, reading a transformers checkpoint's weights (no torch needed).

`gemma2_params` converts a transformers state dict; `gemma2_forward` computes the last hidden state after
the final norm, as transformers' eager attention does (sliding-window layers, attention-logit
soft-capping, grouped-query attention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


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

"""A small learned verifier: a text-conditioned CNN scoring whether an image agrees with its prompt.

Trained with a sigmoid cross-entropy on (image, prompt, label) pairs: label 1 where the image was
rendered from the prompt, 0 for mismatched or perturbed prompts. Text enters through any `TextEncoder`:
its features get a learned position embedding, are pooled by a few learned attention queries, and
modulate every convolution stage (FiLM). The score is the agreement logit.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

from sana_jax.scaling.verifiers import check_inputs
from sana_jax.text_encoder import TextEncoder

Batch = tuple[np.ndarray, Sequence[str], np.ndarray]  # images (B, H, W, 3) in [0, 1], prompts, labels (B,).


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """Shape of the agreement network."""

    text_length: int  # L of the text encoder.
    widths: tuple[int, ...] = (32, 64, 128)  # Channels per stage; each stage halves the resolution.
    text_width: int = 128
    text_queries: int = 4  # Learned attention-pooling queries over the text positions.


class AgreementNet(nn.Module):
    """(images (N, H, W, 3) in [0, 1], text (N, L, C), mask (N, L)) -> agreement logits (N,)."""

    config: VerifierConfig

    @nn.compact
    def __call__(self, images: jax.Array, text: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Dense(cfg.text_width)(text)
        tokens += self.param("text_position", nn.initializers.normal(0.02), (cfg.text_length, cfg.text_width))
        queries = self.param("text_queries", nn.initializers.normal(0.02), (cfg.text_queries, cfg.text_width))
        logits = jnp.einsum("qc,nlc->nql", queries, tokens) / np.sqrt(cfg.text_width)
        logits = jnp.where(mask[:, None, :] > 0, logits, -1e9)
        pooled = jnp.einsum("nql,nlc->nqc", jax.nn.softmax(logits, axis=-1), tokens)
        condition = nn.gelu(nn.Dense(cfg.text_width)(pooled.reshape(len(pooled), -1)))

        x = images * 2.0 - 1.0
        for width in cfg.widths:
            x = nn.Conv(width, (3, 3))(x)
            scale, shift = jnp.split(nn.Dense(2 * width)(condition)[:, None, None, :], 2, axis=-1)
            x = nn.gelu(x * (1.0 + scale) + shift)
            x = nn.gelu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
        features = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2)), condition], axis=-1)
        return nn.Dense(1)(nn.gelu(nn.Dense(cfg.text_width)(features)))[:, 0]


def init_params(config: VerifierConfig, feature_dim: int, key: jax.Array) -> Any:
    """Random parameters for text features of width `feature_dim` (any image size fits them)."""
    images = jnp.zeros((1, 32, 32, 3))
    text = jnp.zeros((1, config.text_length, feature_dim))
    init = jax.jit(AgreementNet(config).init)  # One compile, not one per eager initializer op.
    return init(key, images, text, jnp.ones((1, config.text_length)))["params"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: VerifierConfig, params: Any, images: jax.Array, text: jax.Array, mask: jax.Array):
    return AgreementNet(config).apply({"params": params}, images, text, mask)


def add_mismatched_pairs(images: np.ndarray, prompts: Sequence[str],
                         rng: np.random.Generator) -> Batch:
    """Doubles a batch of rendered (image, prompt) pairs with negatives: each image with another's prompt.

    Returns images (2B, ...), prompts (2B,) and labels (2B,): 1 for the originals, 0 for the shuffled
    prompts unless a shuffled prompt happens to equal the image's own.
    """
    shuffled = [prompts[i] for i in rng.permutation(len(prompts))]
    labels = [1.0] * len(prompts) + [float(a == b) for a, b in zip(shuffled, prompts, strict=True)]
    return np.concatenate([images, images]), [*prompts, *shuffled], np.asarray(labels, np.float32)


def train_learned_verifier(
    batches: Iterable[Batch], text_encoder: TextEncoder, *, steps: int, config: VerifierConfig | None = None,
    learning_rate: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
) -> tuple[VerifierConfig, Any, np.ndarray]:
    """Trains an `AgreementNet` with AdamW on `steps` batches.

    Args:
      batches: yields (images (B, H, W, 3) in [0, 1], prompts (B,), labels (B,) of 1/0); see
        `add_mismatched_pairs` for a way to make negatives.
      text_encoder: encodes the prompts (cached by most encoders, so repeated prompts are cheap).
      steps: optimizer steps (one batch each).
      config: network shape; by default `VerifierConfig(text_length=text_encoder.max_length)`.
      learning_rate, weight_decay: AdamW settings, with cosine decay of the rate.
      seed: initialisation seed.

    Returns:
      (config, params, losses (steps,)).
    """
    config = config or VerifierConfig(text_length=text_encoder.max_length)
    if config.text_length != text_encoder.max_length:
        raise ValueError(f"config.text_length={config.text_length} but the text encoder has "
                         f"max_length={text_encoder.max_length}")
    # An RBG key: XLA compiles its generator far faster than threefry on CPU.
    params = init_params(config, text_encoder.feature_dim, jax.random.key(seed, impl="rbg"))
    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)
    opt_state = jax.jit(optimizer.init)(params)

    @jax.jit
    def train_step(params, opt_state, images, text, mask, labels):
        def loss_fn(params):
            logits = AgreementNet(config).apply({"params": params}, images, text, mask)
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    progress = tqdm(itertools.islice(batches, steps), total=steps, desc="verifier training")
    for images, prompts, labels in progress:
        images = check_inputs(images, prompts)
        text, mask = text_encoder.encode_text(list(prompts))
        labels = np.asarray(labels, np.float32)
        params, opt_state, loss = train_step(params, opt_state, images, text, mask, labels)
        losses.append(float(loss))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    if len(losses) < steps:
        raise ValueError(f"batches ran out after {len(losses)} of {steps} steps")
    return config, params, np.asarray(losses)


def save(path: str, config: VerifierConfig, params: Any) -> None:
    """Writes config and params to one msgpack file."""
    fields = dataclasses.asdict(config) | {"widths": list(config.widths)}  # msgpack takes lists, not tuples.
    state = {"config": fields, "params": jax.device_get(params)}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(state))


def load(path: str) -> tuple[VerifierConfig, Any]:
    """Reads what `save` wrote: (config, params)."""
    with open(path, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    fields = state["config"]
    fields["widths"] = tuple(fields["widths"])
    return VerifierConfig(**fields), state["params"]


class LearnedVerifier:
    """A trained `AgreementNet` as a verifier; `score` is the agreement logit.

    `yes_no_logits` exposes it as a yes/no judge with `VLMJudge`'s interface, so SANA's knockout tournament
    (`search.knockout`) runs on it: the two-class logits (s / 2, -s / 2), whose softmax is (sigmoid(s),
    1 - sigmoid(s)). Under `search.judge_winner` a candidate then beats another exactly when its score is higher.
    """

    def __init__(self, config: VerifierConfig, params: Any, text_encoder: TextEncoder, batch_size: int = 64):
        self.config = config
        self._params = params
        self._text_encoder = text_encoder
        self._batch_size = batch_size

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = check_inputs(images, prompts)
        scores = []
        for start in range(0, len(images), self._batch_size):
            part = slice(start, start + self._batch_size)
            text, mask = self._text_encoder.encode_text(list(prompts[part]))
            scores.append(np.asarray(_logits(self.config, self._params, images[part], text, mask)))
        return np.concatenate(scores).astype(np.float32)

    def yes_no_logits(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(yes, no) logits per image, (N,) float32 each: (score / 2, -score / 2)."""
        half = 0.5 * self.score(images, prompts)
        return half, -half

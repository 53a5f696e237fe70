"""Training examples for the learned verifier from the shapes domain: renders made to look generated.

Each render of `shapes.make_sample` is degraded (`degrade`) and paired with its own prompt and with a
perturbed (`perturb_prompt`) or unrelated one; a pair's label is the checker's verdict on the degraded
render, so no generated sample is ever a training example.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sana_jax.data import checker, shapes
from sana_jax.scaling import learned_verifier
from sana_jax.scaling.evaluation import auc
from sana_jax.text_encoder import TextEncoder

_PALETTE = np.array(list(shapes.COLORS.values()), np.float64)


def degrade(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A render (H, W, 3) uint8 made to look generated: (H, W, 3) float32 in [0, 1].

    With `strength` in [0, 1] scaling each effect: a smooth random warp (up to 3 px), up to three specks
    of palette colour, fading towards the background, Gaussian blur (sigma up to 1.2 px); always a small
    per-channel gain jitter and pixel noise.
    """
    x = image.astype(np.float64)
    h, w, _ = x.shape
    amplitude = strength * rng.uniform(0.0, 3.0)
    if amplitude > 0:
        field = ndimage.gaussian_filter(rng.standard_normal((2, h, w)), (0, 3, 3))
        field *= amplitude / max(np.abs(field).max(), 1e-9)
        rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
        coords = np.stack([rows + field[0], cols + field[1]])
        x = np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
    if rng.random() < strength:
        rows, cols = np.mgrid[0:h, 0:w] + 0.5
        for _ in range(rng.integers(1, 4)):
            cy, cx, radius = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.7, 2.0)
            alpha = np.clip(radius + 0.5 - np.hypot(rows - cy, cols - cx), 0.0, 1.0)[..., None]
            x = x * (1.0 - alpha) + _PALETTE[rng.integers(len(_PALETTE))] * alpha
    if rng.random() < 0.5 * strength:
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        background = np.median(border, axis=0)
        x = background + (x - background) * rng.uniform(0.5, 1.0)
    sigma = strength * rng.uniform(0.0, 1.2)
    if sigma > 0.05:
        x = ndimage.gaussian_filter(x, (sigma, sigma, 0))
    x = x * rng.uniform(0.95, 1.05, size=3) + rng.normal(0.0, rng.uniform(0.0, 4.0), x.shape)
    return np.clip(x / 255.0, 0.0, 1.0).astype(np.float32)


def perturb_prompt(prompt: str, rng: np.random.Generator) -> str:
    """The prompt with one thing changed: a count, a relation, a shape, or a colour (changed or swapped)."""
    spec = shapes.parse_prompt(prompt)
    things = list(spec.things)
    if spec.task == "counting" and rng.random() < 0.6:
        count = rng.choice([c for c in range(1, len(shapes.NUMBERS) + 1) if c != spec.count])
        return shapes.format_prompt(dataclasses.replace(spec, count=int(count)))
    if spec.task == "position" and rng.random() < 0.6:
        relation = rng.choice([r for r in shapes.RELATIONS if r != spec.relation])
        return shapes.format_prompt(dataclasses.replace(spec, relation=str(relation)))
    i = int(rng.integers(len(things)))
    if things[i].color is not None and rng.random() < 0.5:
        if len(things) == 2 and rng.random() < 0.5:
            things = [shapes.Thing(things[0].shape, things[1].color), shapes.Thing(things[1].shape, things[0].color)]
        else:
            color = rng.choice([c for c in shapes.COLORS if c != things[i].color])
            things[i] = shapes.Thing(things[i].shape, str(color))
    else:
        shape = rng.choice([s for s in shapes.SHAPES if s not in {t.shape for t in things}])
        things[i] = shapes.Thing(str(shape), things[i].color)
    return shapes.format_prompt(dataclasses.replace(spec, things=tuple(things)))


def verifier_examples(seed: int, indices: Sequence[int], *, size: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Two labelled pairs per render `shapes.make_sample(seed, i)` for i in indices.

    The render is degraded (`degrade`, strength uniform in [0, 1]) and paired with its own prompt and with
    either a perturbed prompt or an unrelated random one; each label is the checker's verdict on the pair.

    Returns:
      images (2M, size, size, 3) float32 in [0, 1], prompts (2M,), labels (2M,) float32 of 0/1.
    """
    images, prompts, labels = [], [], []
    for i in tqdm(indices, desc="verifier data"):
        sample = shapes.make_sample(seed, int(i), size=size)
        image = degrade(sample.image, rng, rng.uniform())
        if rng.random() < 0.5:
            other = perturb_prompt(sample.prompt, rng)
        else:
            other = shapes.format_prompt(shapes.sample_spec(rng, shapes.TASKS[rng.integers(len(shapes.TASKS))]))
        for prompt in (sample.prompt, other):
            images.append(image)
            prompts.append(prompt)
            labels.append(float(checker.check(prompt, image)))
    return np.stack(images), prompts, np.array(labels, np.float32)


def random_batches(images: np.ndarray, prompts: Sequence[str], labels: np.ndarray, batch_size: int,
                   seed: int) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """Endless batches drawn from the examples, reshuffled every pass."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            part = order[start:start + batch_size]
            yield images[part], [prompts[i] for i in part], labels[part]


def train_on_renders(text_encoder: TextEncoder, *, seed: int, renders: int, size: int, steps: int,
                     batch_size: int, learning_rate: float,
                     widths: Sequence[int]) -> tuple[learned_verifier.VerifierConfig, Any, dict[str, Any]]:
    """Trains a learned verifier on `verifier_examples` of renders 0..renders-1 of domain seed `seed`.

    The last tenth of the renders (at least one) is held out. `widths` are the channels per stage; the text
    width is the last. Returns (config, params, info): the settings, the training positive fraction, the
    final loss (mean of the last 50 steps) and held-out accuracy (logit > 0) and AUC, and the seconds taken.
    """
    held_out = max(renders // 10, 1)
    start = time.perf_counter()
    images, prompts, labels = verifier_examples(seed, range(renders), size=size, rng=np.random.default_rng(seed))
    split = 2 * (renders - held_out)
    batches = random_batches(images[:split], prompts[:split], labels[:split], batch_size, seed)
    widths = tuple(int(w) for w in widths)
    config = learned_verifier.VerifierConfig(text_length=text_encoder.max_length, widths=widths,
                                             text_width=widths[-1])
    config, params, losses = learned_verifier.train_learned_verifier(
        batches, text_encoder, steps=steps, config=config, learning_rate=learning_rate, seed=seed)
    verifier = learned_verifier.LearnedVerifier(config, params, text_encoder, batch_size=256)
    held_scores = verifier.score(images[split:], prompts[split:])
    info = {
        "domain_seed": seed, "renders": renders, "held_out_renders": held_out, "widths": list(widths),
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "positive_fraction": float(labels[:split].mean()), "final_loss": float(losses[-50:].mean()),
        "held_out_accuracy": float(np.mean((held_scores > 0) == (labels[split:] > 0.5))),
        "held_out_auc": auc(held_scores, labels[split:]), "seconds": time.perf_counter() - start,
    }
    return config, params, info

"""SANA 1.5's inference-time scaling law in miniature, on the built-in shapes domain.

Each model samples N_max candidates for each of P evaluation prompts (`sana_jax.evaluation.eval_prompts`); the shapes
checker (the oracle, 0/1) and a small learned verifier score every candidate. For N = 1, 2, 4, ..., N_max
the checker accuracy of the selected sample is averaged over N_max / N disjoint groups of N candidates:
  learned   the learned verifier's best of the N (`search.best_of_n`);
  oracle    the checker's pick: 1 if any of the N is accepted;
  random    any one of the N: the mean acceptance.
Sampling compute per prompt is N x (forward FLOPs) x steps x (2 with classifier-free guidance, else 1),
so with several models the curves compare a small model with search against a larger one without.

The learned verifier trains on renders of the domain (seed --verifier_seed, never the prompt seed) that
are warped, speckled, faded, blurred and noised like generated samples, each paired with its own prompt
and with a perturbed or unrelated one; a pair's label is the checker's verdict on that training render.

  python tools/inference_scaling.py --model="4 blocks=workdir/growth_experiment/base/model" \
      --model="8 blocks (grown)=workdir/growth_experiment/grown/model" --verifier=workdir/inference_scaling/verifier

Writes --out_json (settings, curves, per-task curves, throughput, score tables) and --out_png, and prints
markdown tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from scipy import ndimage
from tqdm import tqdm

from sana_jax import checkpoint
from sana_jax import model as sana_model
from sana_jax.data import checker, shapes
from sana_jax.data.pipeline import DataConfig, element_shapes, make_autoencoder, make_text_encoder, null_caption
from sana_jax.evaluation import eval_prompts
from sana_jax.model.config import SanaConfig
from sana_jax.scaling import learned_verifier, search
from sana_jax.scaling.candidates import generate_candidates

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_MODELS = flags.DEFINE_multi_string("model", [], "NAME=DIR: a sana_jax.checkpoint directory (repeat for several)")
_VERIFIER = flags.DEFINE_string("verifier", "", "directory of the learned verifier: loaded if it holds one, "
                                "else trained and saved there (empty: trained, not saved)")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "P, evaluation prompts")
_PROMPT_SEED = flags.DEFINE_integer("prompt_seed", 1234, "domain seed of the evaluation prompts (the "
                                    "trainer's sampling.eval_seed)")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", 64, "N_max, candidates per prompt (a power of two)")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 8, "candidates per jitted sampling call")
_NOISE_SEED = flags.DEFINE_integer("noise_seed", 0, "seed of the candidates' starting noise")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 1.0, "classifier-free guidance scale (1: no guidance)")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "sampler steps")
_SHIFT = flags.DEFINE_float("shift", 1.0, "timestep shift (the trainer's sampling.shift)")
_SOLVER = flags.DEFINE_string("solver", "flow_dpm_solver", "sampler")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "image side in pixels")
_VERIFIER_SEED = flags.DEFINE_integer("verifier_seed", 7, "domain seed of the verifier's training renders")
_VERIFIER_RENDERS = flags.DEFINE_integer("verifier_renders", 8192, "training renders (two pairs each); the "
                                         "last tenth is held out")
_VERIFIER_STEPS = flags.DEFINE_integer("verifier_steps", 2000, "verifier optimizer steps")
_VERIFIER_BATCH = flags.DEFINE_integer("verifier_batch_size", 128, "verifier pairs per step")
_VERIFIER_LR = flags.DEFINE_float("verifier_lr", 1e-3, "verifier peak learning rate (AdamW, cosine decay)")
_VERIFIER_WIDTHS = flags.DEFINE_list("verifier_widths", ["16", "32", "64"], "verifier channels per stage; the "
                                     "text width is the last")
_THROUGHPUT_PROMPTS = flags.DEFINE_list("throughput_prompts", ["1", "8"], "prompt batch sizes of the throughput "
                                         "measurement (empty: skip it)")
_THROUGHPUT_CANDIDATES = flags.DEFINE_integer("throughput_candidates", 8, "candidates per prompt there")
_REUSE = flags.DEFINE_string("reuse", "", "an earlier --out_json: models sampled and scored there with the "
                             "same settings and verifier reuse its score tables")
_OUT_JSON = flags.DEFINE_string("out_json", "docs/inference_scaling.json", "where the numbers go")
_OUT_PNG = flags.DEFINE_string("out_png", "docs/inference_scaling.png", "where the figure goes")

METHODS = ("random", "learned", "oracle")
VERIFIER_FILE = "verifier.msgpack"
VERIFIER_INFO = "verifier.json"
_PALETTE = np.array(list(shapes.COLORS.values()), np.float64)


# ---------------------------------------------------------------------------------------------
# Accuracy of the selected sample against N.


def candidate_counts(max_candidates: int) -> list[int]:
    """N = 1, 2, 4, ..., max_candidates (a power of two)."""
    if max_candidates < 1 or max_candidates & (max_candidates - 1):
        raise ValueError(f"max_candidates={max_candidates}: expected a power of two")
    return [2**i for i in range(int(math.log2(max_candidates)) + 1)]


def _groups(table: np.ndarray, n: int) -> np.ndarray:
    """(P, N_max) -> (P, N_max // n, n): disjoint groups of n consecutive candidates."""
    num_prompts, num_candidates = table.shape
    if not 1 <= n <= num_candidates:
        raise ValueError(f"n={n}: expected 1 <= n <= {num_candidates} (the candidates per prompt)")
    groups = num_candidates // n
    return table[:, :groups * n].reshape(num_prompts, groups, n)


def selection_accuracy(scores: np.ndarray, accepted: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt checker accuracy (P,) of the best-scoring of n candidates, averaged over the groups.

    Args:
      scores: (P, N_max) verifier scores, higher is better (ties go to the lower index).
      accepted: (P, N_max) checker verdicts, 0/1.
      n: candidates per group; groups are candidates [g n, (g + 1) n) for g < N_max // n.
    """
    score_groups, accepted_groups = _groups(np.asarray(scores), n), _groups(np.asarray(accepted, np.float64), n)
    num_prompts, num_groups, _ = score_groups.shape
    picks = search.best_of_n(score_groups.reshape(num_prompts * num_groups, n), 1)
    picked = np.take_along_axis(accepted_groups.reshape(num_prompts * num_groups, n), picks, axis=1)
    return picked.reshape(num_prompts, num_groups).mean(axis=1)


def oracle_accuracy(accepted: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt accuracy (P,) of the checker's own pick: whether any of n candidates is accepted."""
    return _groups(np.asarray(accepted, np.float64), n).max(axis=2).mean(axis=1)


def random_accuracy(accepted: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt accuracy (P,) of a random one of n candidates: the groups' mean acceptance."""
    return _groups(np.asarray(accepted, np.float64), n).mean(axis=(1, 2))


def scaling_curves(scores: np.ndarray, accepted: np.ndarray, counts: Sequence[int]) -> dict[str, np.ndarray]:
    """{method: (len(counts), P) per-prompt accuracy} for METHODS at each N in counts."""
    return {
        "random": np.stack([random_accuracy(accepted, n) for n in counts]),
        "learned": np.stack([selection_accuracy(scores, accepted, n) for n in counts]),
        "oracle": np.stack([oracle_accuracy(accepted, n) for n in counts]),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of scores (M,) for 0/1 labels (M,); ties count half; NaN with one class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values (M,), tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def mean_within_prompt_auc(scores: np.ndarray, accepted: np.ndarray) -> tuple[float, int]:
    """Mean AUC (P, N) over the prompts with accepted and rejected candidates, and how many those are."""
    values = [auc(s, a) for s, a in zip(scores, accepted, strict=True)]
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def summarize(per_prompt: np.ndarray) -> dict[str, list[float]]:
    """(K, P) per-prompt values -> {"mean": (K,), "se": (K,)}: mean over prompts and its standard error."""
    num_prompts = per_prompt.shape[1]
    se = per_prompt.std(axis=1, ddof=1) / np.sqrt(num_prompts) if num_prompts > 1 else np.zeros(len(per_prompt))
    return {"mean": per_prompt.mean(axis=1).tolist(), "se": se.tolist()}


# ---------------------------------------------------------------------------------------------
# The learned verifier's training data.


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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def get_verifier(text_encoder: Any, size: int) -> tuple[learned_verifier.LearnedVerifier, dict[str, Any]]:
    """The learned verifier of --verifier (trained and saved there when missing) and its description."""
    folder = Path(_VERIFIER.value) if _VERIFIER.value else None
    if folder is not None and (folder / VERIFIER_FILE).is_file():
        config, params = learned_verifier.load(str(folder / VERIFIER_FILE))
        info = json.loads((folder / VERIFIER_INFO).read_text()) if (folder / VERIFIER_INFO).is_file() else {}
        info |= {"path": str(folder), "digest": _file_digest(folder / VERIFIER_FILE), "loaded": True}
        print(f"learned verifier loaded from {folder}")
        return learned_verifier.LearnedVerifier(config, params, text_encoder, batch_size=256), info

    if _VERIFIER_SEED.value == _PROMPT_SEED.value:
        raise app.UsageError(f"--verifier_seed={_VERIFIER_SEED.value} equals --prompt_seed: the verifier must "
                             "train on other renders than the evaluation's")
    renders = _VERIFIER_RENDERS.value
    held_out = max(renders // 10, 1)
    rng = np.random.default_rng(_VERIFIER_SEED.value)
    start = time.perf_counter()
    images, prompts, labels = verifier_examples(_VERIFIER_SEED.value, range(renders), size=size, rng=rng)
    split = 2 * (renders - held_out)
    batches = random_batches(images[:split], prompts[:split], labels[:split], _VERIFIER_BATCH.value,
                             _VERIFIER_SEED.value)
    widths = tuple(int(w) for w in _VERIFIER_WIDTHS.value)
    config = learned_verifier.VerifierConfig(text_length=text_encoder.max_length, widths=widths,
                                             text_width=widths[-1])
    config, params, losses = learned_verifier.train_learned_verifier(
        batches, text_encoder, steps=_VERIFIER_STEPS.value, config=config, learning_rate=_VERIFIER_LR.value,
        seed=_VERIFIER_SEED.value)
    verifier = learned_verifier.LearnedVerifier(config, params, text_encoder, batch_size=256)
    held_scores = verifier.score(images[split:], prompts[split:])
    info = {
        "domain_seed": _VERIFIER_SEED.value, "renders": renders, "held_out_renders": held_out,
        "widths": list(widths), "steps": _VERIFIER_STEPS.value, "batch_size": _VERIFIER_BATCH.value,
        "learning_rate": _VERIFIER_LR.value,
        "positive_fraction": float(labels[:split].mean()), "final_loss": float(losses[-50:].mean()),
        "held_out_accuracy": float(np.mean((held_scores > 0) == (labels[split:] > 0.5))),
        "held_out_auc": auc(held_scores, labels[split:]), "seconds": time.perf_counter() - start,
    }
    print(f"learned verifier: held-out accuracy {info['held_out_accuracy']:.3f}, AUC {info['held_out_auc']:.3f} "
          f"on {2 * held_out} degraded renders ({info['seconds']:.0f} s)")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        learned_verifier.save(str(folder / VERIFIER_FILE), config, params)
        (folder / VERIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        info |= {"path": str(folder), "digest": _file_digest(folder / VERIFIER_FILE)}
    return verifier, info | {"loaded": False}


# ---------------------------------------------------------------------------------------------
# Sampling, scoring and cost.


@dataclasses.dataclass
class Model:
    """A loaded checkpoint: display name, directory, config and params."""

    name: str
    path: str
    config: SanaConfig
    params: Any


def parse_model(value: str) -> tuple[str, str]:
    """"NAME=DIR" -> (NAME, DIR); DIR must hold a complete checkpoint."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise app.UsageError(f"--model={value!r}: expected NAME=DIR")
    if not (Path(path) / checkpoint.CONFIG_FILE).is_file():
        raise app.UsageError(f"--model={value!r}: no {checkpoint.CONFIG_FILE} in {path}")
    return name, path


def sampler_settings() -> dict[str, Any]:
    """The sampler flags as `generate_candidates` keywords."""
    return {"num_steps": _NUM_STEPS.value, "guidance_scale": _GUIDANCE.value, "shift": _SHIFT.value,
            "solver": _SOLVER.value}


def sample_images(model: Model, text: np.ndarray, mask: np.ndarray, null: tuple[np.ndarray, np.ndarray],
                  autoencoder: Any, *, num_candidates: int, chunk_size: int, side: int) -> np.ndarray:
    """N candidates for each of P prompts (text (P, L, C)): images (P, N, H, W, 3) float32 in [0, 1]."""
    key = jax.random.key(_NOISE_SEED.value)
    chunks = []
    for first in tqdm(range(0, num_candidates, chunk_size), desc=f"sampling {model.name}"):
        latents = generate_candidates(
            model.params, model.config, text, mask, *null, key, num_candidates=min(chunk_size, num_candidates - first),
            chunk_size=chunk_size, first_candidate=first, height=side, width=side, **sampler_settings())
        decoded = np.asarray(autoencoder.decode(latents.reshape(-1, *latents.shape[2:])), np.float32)
        chunks.append(np.clip(decoded, 0.0, 1.0).reshape(*latents.shape[:2], *decoded.shape[1:]))
    return np.concatenate(chunks, axis=1)


def checker_table(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Checker verdicts (P, N) int of candidates (P, N, H, W, 3) for their P prompts."""
    return np.array([[int(checker.check(p, image)) for image in row]
                     for p, row in zip(tqdm(prompts, desc="checker"), images, strict=True)])


def verifier_table(verifier: learned_verifier.LearnedVerifier, images: np.ndarray,
                   prompts: Sequence[str]) -> np.ndarray:
    """Learned-verifier scores (P, N) float32 of candidates (P, N, H, W, 3)."""
    num_prompts, num_candidates = images.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(num_candidates)]
    scores = verifier.score(images.reshape(-1, *images.shape[2:]), flat_prompts)
    return scores.reshape(num_prompts, num_candidates)


def forward_flops(model: Model, side: int, text_length: int) -> float:
    """XLA's FLOP count of one model forward on one latent (side, side, C)."""
    config = model.config
    args = (jnp.zeros((1, side, side, config.in_channels)), jnp.full((1,), 500.0),
            jnp.zeros((1, text_length, config.caption_channels)), jnp.ones((1, text_length), jnp.int32))
    forward = jax.jit(lambda params, *a: sana_model.forward(params, config, *a))
    cost = forward.lower(model.params, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def measure_throughput(model: Model, text: np.ndarray, mask: np.ndarray, null: tuple[np.ndarray, np.ndarray], *,
                       num_candidates: int, side: int, repeats: int = 5) -> dict[str, float]:
    """Latents per second for N candidates of P prompts (text (P, L, C)): one vmapped call against N calls.

    Both run compiled (a warm-up call first), alternating, `repeats` times each; rates use the median time.
    Also the largest difference between the two paths' latents, which start from the same noise.
    """
    key = jax.random.key(_NOISE_SEED.value)
    run = lambda n, first: generate_candidates(model.params, model.config, text, mask, *null, key,
                                               num_candidates=n, first_candidate=first, height=side, width=side,
                                               **sampler_settings())
    paths = {"vmapped": lambda: run(num_candidates, 0),
             "loop": lambda: np.concatenate([run(1, i) for i in range(num_candidates)], axis=1)}
    outputs = {name: fn() for name, fn in paths.items()}
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: len(text) * num_candidates / float(np.median(t)) for name, t in times.items()}
    return {"prompts": len(text), "candidates": num_candidates, "repeats": repeats,
            "vmapped_images_per_s": rate["vmapped"], "loop_images_per_s": rate["loop"],
            "speedup": rate["vmapped"] / rate["loop"],
            "max_abs_difference": float(np.abs(outputs["vmapped"] - outputs["loop"]).max())}


# ---------------------------------------------------------------------------------------------
# Reports.


def model_report(model: Model, prompts: Sequence[str], accepted: np.ndarray, scores: np.ndarray,
                 counts: Sequence[int], image_gflops: float) -> dict[str, Any]:
    """Curves (overall and per task), verifier agreement and compute of one model's score tables."""
    curves = scaling_curves(scores, accepted, counts)
    tasks = [shapes.parse_prompt(p).task for p in prompts]
    per_task = {}
    for task in shapes.TASKS:
        rows = [i for i, t in enumerate(tasks) if t == task]
        if rows:
            per_task[task] = {"prompts": len(rows)} | {m: summarize(c[:, rows])["mean"] for m, c in curves.items()}
    within, informative = mean_within_prompt_auc(scores, accepted)
    return {
        "path": model.path, "depth": model.config.depth, "acceptance": float(accepted.mean()),
        "image_gflops": image_gflops, "compute_gflops": [n * image_gflops for n in counts],
        "curves": {m: summarize(c) for m, c in curves.items()}, "per_task": per_task,
        "verifier_auc": auc(scores, accepted), "verifier_within_prompt_auc": within,
        "prompts_with_both_verdicts": informative,
    }


def matched_compute(reports: dict[str, dict[str, Any]], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Rows of equal depth x N (sampling compute in block-passes): each model's N and accuracies there."""
    budgets = sorted({r["depth"] * n for r in reports.values() for n in counts})
    rows = []
    for budget in budgets:
        row = {"depth_x_n": budget, "models": {}}
        for name, report in reports.items():
            n = budget // report["depth"]
            if budget % report["depth"] == 0 and n in counts:
                k = list(counts).index(n)
                row["models"][name] = {"n": n} | {m: report["curves"][m]["mean"][k] for m in METHODS}
        if len(row["models"]) > 1:
            rows.append(row)
    return rows


def markdown_tables(results: dict[str, Any]) -> str:
    counts, reports = results["counts"], results["models"]
    lines = ["| model | N | GFLOPs / prompt | random | learned best-of-N | oracle (checker) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in reports.items():
        for k, n in enumerate(counts):
            cells = [f"{r['curves'][m]['mean'][k]:.3f} ± {r['curves'][m]['se'][k]:.3f}" for m in METHODS]
            lines.append(f"| {name} | {n} | {r['compute_gflops'][k]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"| model | task | prompts | random | learned N={counts[-1]} | oracle N={counts[-1]} |",
              "|---|---|---:|---:|---:|---:|"]
    for name, r in reports.items():
        for task, t in r["per_task"].items():
            lines.append(f"| {name} | {task} | {t['prompts']} | {t['random'][0]:.3f} | {t['learned'][-1]:.3f} | "
                         f"{t['oracle'][-1]:.3f} |")
    if results["matched_compute"]:
        names = list(reports)
        lines += ["", "| depth x N | " + " | ".join(f"{n}: N, learned, oracle" for n in names) + " |",
                  "|---:|" + "---|" * len(names)]
        for row in results["matched_compute"]:
            cells = [(f"{row['models'][n]['n']}, {row['models'][n]['learned']:.3f}, {row['models'][n]['oracle']:.3f}"
                      if n in row["models"] else "") for n in names]
            lines.append(f"| {row['depth_x_n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Three panels: accuracy vs N, accuracy vs sampling compute, learned best-of-N per task."""
    counts, reports = results["counts"], results["models"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (by_n, by_compute, by_task) = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    styles = {"learned": ("-", "o"), "oracle": ("--", "^"), "random": (":", None)}
    for m, (name, r) in enumerate(reports.items()):
        color = colors[m % len(colors)]
        for method in METHODS:
            line, marker = styles[method]
            mean, se = np.array(r["curves"][method]["mean"]), np.array(r["curves"][method]["se"])
            by_n.plot(counts, mean, line, marker=marker, color=color, label=f"{name}: {method}")
            if method != "random":
                by_n.fill_between(counts, mean - se, mean + se, color=color, alpha=0.12)
                by_compute.plot(r["compute_gflops"], mean, line, marker=marker, color=color,
                                label=f"{name}: {method}")
    by_n.set(xlabel="N candidates per prompt", title="accuracy vs N (band: ±1 s.e. over prompts)")
    by_compute.set(xlabel="sampling GFLOPs per prompt", title="accuracy vs sampling compute")
    task_lines = ("-", "--", "-.", ":")
    for m, (name, r) in enumerate(reports.items()):
        line = task_lines[m % len(task_lines)]
        for t, (task, values) in enumerate(r["per_task"].items()):
            by_task.plot(counts, values["learned"], line, marker="o", markersize=3, color=colors[t % len(colors)],
                         label=f"{task} ({values['prompts']} prompts)" if m == 0 else None)
        by_task.plot([], [], line, color="black", label=name)
    by_task.set(xlabel="N candidates per prompt", title="learned best-of-N per task")
    for axes in (by_n, by_compute, by_task):
        axes.set_xscale("log", base=2)
        axes.set_ylabel("checker accuracy of the selected sample")
        axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    for axes in (by_n, by_task):
        axes.set_xticks(counts)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reusable_tables(name: str, path: str, settings: dict[str, Any], verifier_digest: str | None) -> dict | None:
    """Score tables of model `name` from --reuse when its checkpoint, settings and verifier match."""
    if not _REUSE.value or not Path(_REUSE.value).is_file() or verifier_digest is None:
        return None
    earlier = json.loads(Path(_REUSE.value).read_text())
    report = earlier.get("models", {}).get(name)
    if (report is None or report["path"] != path or earlier.get("settings") != settings
            or earlier.get("verifier", {}).get("digest") != verifier_digest
            or report["tables"]["prompts"] != eval_prompts(DataConfig(resolution=settings["resolution"]),
                                                           settings["num_prompts"], settings["prompt_seed"])):
        return None
    return report["tables"]


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _MODELS.value:
        raise app.UsageError("give at least one --model=NAME=DIR")
    named = [parse_model(v) for v in _MODELS.value]
    if len({n for n, _ in named}) != len(named):
        raise app.UsageError("model names must differ")
    counts = candidate_counts(_MAX_CANDIDATES.value)

    # The latent space and text encoder the models were trained with (their metadata; else the defaults).
    data = DataConfig.from_mapping({**checkpoint.load_metadata(named[0][1]).get("data", {}), "source": "shapes",
                                    "resolution": _RESOLUTION.value})
    text_encoder, autoencoder = make_text_encoder(data), make_autoencoder(data)
    expected = element_shapes(data, autoencoder, text_encoder)
    side, text_length = expected["latents"][0], expected["text"][0]
    null = null_caption(data, text_encoder)
    prompts = eval_prompts(data, _NUM_PROMPTS.value, _PROMPT_SEED.value)
    text, mask = text_encoder.encode_text(prompts)
    settings = {"num_prompts": _NUM_PROMPTS.value, "prompt_seed": _PROMPT_SEED.value,
                "max_candidates": _MAX_CANDIDATES.value, "noise_seed": _NOISE_SEED.value,
                "resolution": _RESOLUTION.value} | sampler_settings()

    verifier, verifier_info = get_verifier(text_encoder, _RESOLUTION.value)
    reports, throughput = {}, {}
    for name, path in named:
        config, params = checkpoint.load(path)
        if (config.in_channels, config.caption_channels) != (expected["latents"][-1], expected["text"][-1]):
            raise app.UsageError(f"model {name!r} takes {config.in_channels} latent / {config.caption_channels} "
                                 f"text channels; the shapes data gives {expected['latents'][-1]} / "
                                 f"{expected['text'][-1]}")
        model = Model(name, path, config, params)
        passes = 1 if _GUIDANCE.value == 1.0 else 2
        image_gflops = forward_flops(model, side, text_length) * _NUM_STEPS.value * passes / 1e9
        tables = reusable_tables(name, path, settings, verifier_info.get("digest"))
        if tables is None:
            start = time.perf_counter()
            images = sample_images(model, text, mask, null, autoencoder, num_candidates=_MAX_CANDIDATES.value,
                                   chunk_size=_CHUNK_SIZE.value, side=side)
            seconds = time.perf_counter() - start
            tables = {"prompts": prompts, "accepted": checker_table(images, prompts).tolist(),
                      "verifier_scores": np.round(verifier_table(verifier, images, prompts), 4).tolist(),
                      "sampling_seconds": seconds}
            print(f"{name}: {images.shape[0] * images.shape[1]} images in {seconds:.0f} s")
        else:
            print(f"{name}: score tables reused from {_REUSE.value}")
        accepted, scores = np.array(tables["accepted"]), np.array(tables["verifier_scores"])
        reports[name] = model_report(model, prompts, accepted, scores, counts, image_gflops) | {"tables": tables}
        throughput[name] = []
        for p in (int(v) for v in _THROUGHPUT_PROMPTS.value):
            t = measure_throughput(model, text[:p], mask[:p], null, side=side,
                                   num_candidates=_THROUGHPUT_CANDIDATES.value)
            throughput[name].append(t)
            print(f"{name}: {t['prompts']} prompts x {t['candidates']} candidates: vmapped "
                  f"{t['vmapped_images_per_s']:.1f} images/s, loop {t['loop_images_per_s']:.1f} images/s "
                  f"({t['speedup']:.2f}x; largest latent difference {t['max_abs_difference']:.1e})")

    results = {"command": " ".join(sys.argv), "settings": settings, "counts": counts, "verifier": verifier_info,
               "models": reports, "throughput": throughput, "matched_compute": matched_compute(reports, counts),
               "device": str(jax.devices()[0].device_kind)}
    print(markdown_tables(results))
    for name, r in reports.items():
        print(f"{name}: depth {r['depth']}, {r['image_gflops']:.3f} GFLOPs per image, acceptance "
              f"{r['acceptance']:.3f}, verifier AUC {r['verifier_auc']:.3f} (within prompts "
              f"{r['verifier_within_prompt_auc']:.3f} over {r['prompts_with_both_verdicts']} prompts)")
    Path(_OUT_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT_JSON.value).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, _OUT_PNG.value)
    print(f"wrote {_OUT_JSON.value} and {_OUT_PNG.value}")


if __name__ == "__main__":
    app.run(main)

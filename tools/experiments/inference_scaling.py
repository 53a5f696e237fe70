"""SANA 1.5's inference-time scaling law in miniature, on the built-in shapes domain.

Each model samples N_max candidates for each of P evaluation prompts (`sana_jax.evaluation.eval_prompts`); the shapes
checker (the oracle, 0/1) and a small learned verifier score every candidate. For N = 1, 2, 4, ..., N_max
the checker accuracy of the selected sample is averaged over N_max / N disjoint groups of N candidates:
  learned   the learned verifier's best of the N (`search.select_from_tables`);
  oracle    the checker's pick: 1 if any of the N is accepted;
  random    any one of the N: the mean acceptance
(the curves, AUC and matched-compute rows come from `sana_jax.scaling.evaluation`).
Sampling compute per prompt is N x (forward FLOPs) x steps x (2 with classifier-free guidance, else 1),
so with several models the curves compare a small model with search against a larger one without.

The learned verifier trains on renders of the domain (seed --verifier_seed, never the prompt seed) that
are warped, speckled, faded, blurred and noised like generated samples, each paired with its own prompt
and with a perturbed or unrelated one; a pair's label is the checker's verdict on that training render
(`sana_jax.scaling.verifier_data`).

  python tools/experiments/inference_scaling.py --model="4 blocks (base)=workdir/grow/base/model" \
      --model="12 blocks (grown)=workdir/grow/model" --verifier=workdir/inference_scaling/verifier \
      --guidance_scale=1.5 --shift=6

Writes --out_json (settings, curves, per-task curves, throughput, score tables) and --out_png, and prints
markdown tables. --reuse=<an earlier --out_json> takes the score tables of models sampled there with the same
settings and verifier; with fewer candidates there, only the missing ones are sampled (candidate i always starts
from the same noise), so N_max grows in steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from sana_jax import checkpoint, cli
from sana_jax import model as sana_model
from sana_jax.data import shapes
from sana_jax.data.pipeline import DataConfig, element_shapes, make_autoencoder, make_text_encoder, null_caption
from sana_jax.evaluation import eval_prompts
from sana_jax.model.config import SanaConfig
from sana_jax.scaling import evaluation, learned_verifier, search, verifier_data
from sana_jax.scaling.candidates import generate_candidates
from sana_jax.scaling.verifiers import CheckerVerifier

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
_QUICK = flags.DEFINE_bool("quick", False, "a minute's smoke run: 6 prompts, 4 sampler steps, a small verifier "
                           "trained briefly, throughput on 1 prompt x 2 candidates (--max_candidates as given)")
_OUT_JSON = flags.DEFINE_string("out_json", "docs/inference_scaling.json", "where the numbers go")
_OUT_PNG = flags.DEFINE_string("out_png", "docs/inference_scaling.png", "where the figure goes")

QUICK = {"num_prompts": 6, "num_steps": 4, "verifier_renders": 256, "verifier_steps": 20, "verifier_batch_size": 32,
         "verifier_widths": ["8", "16"], "throughput_prompts": ["1"], "throughput_candidates": 2}
VERIFIER_FILE = "verifier.msgpack"
VERIFIER_INFO = "verifier.json"


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
    config, params, info = verifier_data.train_on_renders(
        text_encoder, seed=_VERIFIER_SEED.value, renders=_VERIFIER_RENDERS.value, size=size,
        steps=_VERIFIER_STEPS.value, batch_size=_VERIFIER_BATCH.value, learning_rate=_VERIFIER_LR.value,
        widths=[int(w) for w in _VERIFIER_WIDTHS.value])
    verifier = learned_verifier.LearnedVerifier(config, params, text_encoder, batch_size=256)
    print(f"learned verifier: held-out accuracy {info['held_out_accuracy']:.3f}, AUC {info['held_out_auc']:.3f} "
          f"on {2 * info['held_out_renders']} degraded renders ({info['seconds']:.0f} s)")
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
                  autoencoder: Any, *, candidates: range, chunk_size: int, side: int) -> np.ndarray:
    """Candidates `candidates` (indices of their noise) for each of P prompts (text (P, L, C)): images
    (P, len(candidates), H, W, 3) float32 in [0, 1]."""
    key = jax.random.key(_NOISE_SEED.value)
    chunks = []
    for first in tqdm(range(candidates.start, candidates.stop, chunk_size), desc=f"sampling {model.name}"):
        latents = generate_candidates(
            model.params, model.config, text, mask, *null, key, num_candidates=min(chunk_size, candidates.stop - first),
            chunk_size=chunk_size, first_candidate=first, height=side, width=side, **sampler_settings())
        decoded = np.asarray(autoencoder.decode(latents.reshape(-1, *latents.shape[2:])), np.float32)
        chunks.append(np.clip(decoded, 0.0, 1.0).reshape(*latents.shape[:2], *decoded.shape[1:]))
    return np.concatenate(chunks, axis=1)


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
    tasks = [shapes.parse_prompt(p).task for p in prompts]
    cost = {"path": model.path, "depth": model.config.depth, "image_gflops": image_gflops,
            "compute_gflops": [n * image_gflops for n in counts]}
    return cost | evaluation.score_report(scores, accepted, counts, tasks)


def markdown_tables(results: dict[str, Any]) -> str:
    counts, reports = results["counts"], results["models"]
    lines = ["| model | N | GFLOPs / prompt | random | learned best-of-N | oracle (checker) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in reports.items():
        for k, n in enumerate(counts):
            cells = [f"{r['curves'][m]['mean'][k]:.3f} ± {r['curves'][m]['se'][k]:.3f}" for m in evaluation.CURVES]
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
        for method in evaluation.CURVES:
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
    """Score tables of model `name` from --reuse when its checkpoint, verifier and settings match, up to
    max_candidates: an earlier run with fewer candidates gives their columns (candidate i always starts from
    the same noise), which this run extends; one with more gives its first max_candidates columns."""
    if not _REUSE.value or not Path(_REUSE.value).is_file() or verifier_digest is None:
        return None
    earlier = json.loads(Path(_REUSE.value).read_text())
    report = earlier.get("models", {}).get(name)
    other = lambda s: {k: v for k, v in s.items() if k != "max_candidates"}
    if (report is None or report["path"] != path or other(earlier.get("settings", {})) != other(settings)
            or earlier.get("verifier", {}).get("digest") != verifier_digest
            or report["tables"]["prompts"] != eval_prompts(DataConfig(resolution=settings["resolution"]),
                                                           settings["num_prompts"], settings["prompt_seed"])):
        return None
    n = settings["max_candidates"]
    tables = report["tables"]
    share = min(1.0, n / len(tables["accepted"][0]))
    return {**tables, "accepted": [row[:n] for row in tables["accepted"]],
            "verifier_scores": [row[:n] for row in tables["verifier_scores"]],
            "sampling_seconds": tables["sampling_seconds"] * share}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _QUICK.value:
        for name, value in QUICK.items():
            setattr(flags.FLAGS, name, value)
    if not _MODELS.value:
        raise app.UsageError("give at least one --model=NAME=DIR")
    named = [parse_model(v) for v in _MODELS.value]
    if len({n for n, _ in named}) != len(named):
        raise app.UsageError("model names must differ")
    counts = evaluation.candidate_counts(_MAX_CANDIDATES.value)

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
        reused = 0 if tables is None else len(tables["accepted"][0])
        if reused:
            print(f"{name}: score tables of {reused} candidates reused from {_REUSE.value}")
        if reused < _MAX_CANDIDATES.value:
            start = time.perf_counter()
            images = sample_images(model, text, mask, null, autoencoder,
                                   candidates=range(reused, _MAX_CANDIDATES.value), chunk_size=_CHUNK_SIZE.value,
                                   side=side)
            seconds = time.perf_counter() - start
            accepted = search.verifier_tables(CheckerVerifier(), images, prompts)["scores"].astype(int)
            scores = np.round(search.verifier_tables(verifier, images, prompts)["scores"], 4)
            print(f"{name}: {images.shape[0] * images.shape[1]} images in {seconds:.0f} s")
            if reused:
                accepted = np.concatenate([tables["accepted"], accepted], axis=1)
                scores = np.concatenate([tables["verifier_scores"], scores], axis=1)
                seconds += tables["sampling_seconds"]
            tables = {"prompts": prompts, "accepted": accepted.tolist(), "verifier_scores": scores.tolist(),
                      "sampling_seconds": seconds}
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
               "models": reports, "throughput": throughput, "device": str(jax.devices()[0].device_kind),
               "matched_compute": evaluation.matched_compute(reports, counts)}
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
    cli.use_compilation_cache()
    app.run(main)

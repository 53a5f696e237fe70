"""SANA 1.5's depth pruning in miniature, in accuracy: which blocks to keep, and what a short fine-tune gives back.

A trained model is cut to 3/4 and to 1/2 of its blocks (--fractions: the share of blocks removed) in several
ways, and every cut is scored with GenEval-lite (`sana_jax.evaluation`, per task) right after the cut and after
--finetune_steps steps of the trainer (SANA 1.5 prunes 4.8B to 1.6B and fine-tunes 100 steps):
  importance             block importance on noised training latents (`surgery.block_importance`);
  importance_on_samples  block importance along the model's own sampling path from calibration prompts
                         (`surgery.block_importance_on_samples`);
  first                  the first blocks;
  random<i>              --random_cuts distinct random cuts, or every possible cut when there are no more.
Calibration data (latents and prompts) come from domain seed --calibration_seed, never the evaluation's.

  python tools/experiments/pruning_experiment.py --model=workdir/pretrain_long/model

Each distinct cut is fine-tuned as a trainer run in --workdir/<fraction>/keep_<blocks> and its scores are saved
there, so a rerun resumes where it stopped. Writes --out_json and --out_png and prints markdown tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import ConfigDict, config_flags

from sana_jax import checkpoint, evaluation, surgery
from sana_jax.cli import fail, use_compilation_cache
from sana_jax.data import shapes
from sana_jax.data.pipeline import DataConfig, make_text_encoder, make_train_iterator, null_caption
from sana_jax.sample import recorded_settings
from sana_jax.trainer import train

_MODEL = flags.DEFINE_string("model", "", "the trained model to prune: a sana_jax.checkpoint directory written by "
                             "the trainer (model/), whose metadata names its data and sampler")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "training config of the fine-tunes "
                                          "(optimizer, noise levels, batch); its data section is the model's own",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pruning_experiment", "one folder per cut")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.25", "0.5"], "shares of the blocks to remove, one cut size each")
_RANDOM_CUTS = flags.DEFINE_integer("random_cuts", 5, "random cuts per size (every cut when there are fewer)")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100, "fine-tuning steps after each cut")
_FINETUNE_LR = flags.DEFINE_float("finetune_lr", 3e-4, "fine-tuning learning rate (after 10 warmup steps)")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 300, "GenEval-lite evaluation prompts (the tasks in turn)")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 2, "samples per evaluation prompt")
_CALIBRATION_PROMPTS = flags.DEFINE_integer("calibration_prompts", 128, "prompts of the sampling-path importance")
_CALIBRATION_BATCHES = flags.DEFINE_integer("calibration_batches", 4, "training batches of the latent importance")
_CALIBRATION_SEED = flags.DEFINE_integer("calibration_seed", 7, "domain seed of the calibration data")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random cuts")
_QUICK = flags.DEFINE_bool("quick", False, "a few minutes' smoke run: half the blocks cut, one random cut, "
                           "3 fine-tuning steps, 12 prompts")
_OUT_JSON = flags.DEFINE_string("out_json", "docs/pruning.json", "where the numbers go")
_OUT_PNG = flags.DEFINE_string("out_png", "docs/pruning.png", "where the figure goes")


def settings() -> dict:
    """The run's settings: the flags, with --quick's reductions applied."""
    s = {"fractions": [float(f) for f in _FRACTIONS.value], "random_cuts": _RANDOM_CUTS.value,
         "finetune_steps": _FINETUNE_STEPS.value, "finetune_lr": _FINETUNE_LR.value, "num_prompts": _NUM_PROMPTS.value,
         "samples_per_prompt": _SAMPLES.value, "calibration_prompts": _CALIBRATION_PROMPTS.value,
         "calibration_batches": _CALIBRATION_BATCHES.value}
    if _QUICK.value:
        s.update(fractions=[0.5], random_cuts=1, finetune_steps=3, num_prompts=12, samples_per_prompt=1,
                 calibration_prompts=8, calibration_batches=1)
    bad = [f for f in s["fractions"] if not 0 < f < 1]
    if bad:
        fail(f"--fractions={_FRACTIONS.value}: expected shares strictly between 0 and 1")
    return s


def score(params: dict, model_config, data: DataConfig, sampler: dict, s: dict) -> dict:
    """GenEval-lite of a model: accuracy per task and overall, and the (accepted, judged) counts."""
    result = evaluation.evaluate(params, model_config, data, num_prompts=s["num_prompts"],
                                 seed=_CONFIG.value.sampling.eval_seed, samples_per_prompt=s["samples_per_prompt"],
                                 **sampler)
    return {"accuracy": result.accuracy(), "counts": result.counts()}


def importances(params: dict, model_config, data: DataConfig, sampler: dict, s: dict, batch_size: int) -> dict:
    """Block importance of the unpruned model, both ways (per block, and per timestep or sampler step)."""
    calibration = DataConfig.from_mapping({**dataclasses.asdict(data), "caption_dropout": 0.0,
                                           "domain_seed": _CALIBRATION_SEED.value})
    iterator = make_train_iterator(calibration, seed=0, batch_size=batch_size, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(s["calibration_batches"])]
    on_latents = surgery.block_importance_per_timestep(params, model_config, batches)
    encoder = make_text_encoder(data)
    text, mask = encoder.encode_text(shapes.prompts(_CALIBRATION_SEED.value, s["calibration_prompts"],
                                                    tasks=data.tasks))
    null_text, null_mask = null_caption(data, encoder)
    side = batches[0]["latents"].shape[1]
    on_samples, steps = surgery.block_importance_on_samples(
        params, model_config, text, mask, null_text, null_mask, height=side, width=side, **sampler)
    return {"on_latents": on_latents.mean(axis=0).tolist(), "on_latents_per_timestep": on_latents.tolist(),
            "timesteps": list(surgery.DEFAULT_TIMESTEPS), "on_samples": on_samples.mean(axis=0).tolist(),
            "on_samples_per_step": on_samples.tolist(), "sampler_timesteps": steps.tolist()}


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two importance vectors."""
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def cuts(depth: int, keep: int, importance: dict, random_cuts: int, seed: int) -> dict[str, tuple[int, ...]]:
    """The arms at one cut size: {name: kept blocks in model order}."""
    arms = {"importance": tuple(surgery.most_important_blocks(importance["on_latents"], keep)),
            "importance_on_samples": tuple(surgery.most_important_blocks(importance["on_samples"], keep)),
            "first": tuple(range(keep))}
    every = list(itertools.combinations(range(depth), keep))
    if len(every) <= random_cuts:
        chosen = every
    else:
        rng = np.random.default_rng(seed)
        chosen = [every[i] for i in sorted(rng.choice(len(every), random_cuts, replace=False))]
    arms |= {f"random{i}": blocks for i, blocks in enumerate(chosen)}
    return arms


def finetune_config(data: DataConfig, s: dict) -> ConfigDict:
    c = ConfigDict(_CONFIG.value.to_dict())
    c.data = ConfigDict(dataclasses.asdict(data))
    c.steps = c.checkpoint_every = s["finetune_steps"]
    c.log_every = max(1, min(c.log_every, s["finetune_steps"]))
    c.optimizer.lr = s["finetune_lr"]
    c.optimizer.warmup_steps = min(10, s["finetune_steps"])
    c.sample_every = c.eval_every = c.eval_batches = 0
    c.sampling.num_prompts = 0
    return c


def run_cut(folder: Path, blocks: tuple[int, ...], params: dict, model_config, data: DataConfig, sampler: dict,
            s: dict) -> dict:
    """Scores of one cut right after it and after fine-tuning (saved in `folder`, reused when present)."""
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    pruned_config, pruned = surgery.prune(params, model_config, blocks)
    before_file = folder / "before.json"
    if before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = score(pruned, pruned_config, data, sampler, s)
        folder.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps(before) + "\n")
    config = finetune_config(data, s)
    tuned_config, tuned = train(config, folder, params=pruned, model_config=pruned_config,
                                stage=f"keep {','.join(map(str, blocks))}")
    result = {"kept": list(blocks), "before": before, "after": score(tuned, tuned_config, data, sampler, s)}
    done.write_text(json.dumps(result) + "\n")
    return result


def plot(results: dict, path: Path) -> None:
    """Per cut size, every distinct cut (labelled by its blocks and the methods that chose it) before and after
    fine-tuning; then the two importance profiles."""
    sizes = results["cuts"]
    fig = Figure(figsize=(5.2 * (len(sizes) + 1), 4.4), layout="constrained")
    axes = fig.subplots(1, len(sizes) + 1)
    short = {"importance": "importance", "importance_on_samples": "on samples", "first": "first"}
    for ax, size in zip(axes, sizes.values(), strict=False):
        distinct = {}
        for arm, r in size["arms"].items():
            entry = distinct.setdefault(tuple(r["kept"]), {"result": r, "chosen_by": []})
            if arm in short:
                entry["chosen_by"].append(short[arm])
        order = sorted(distinct, key=lambda k: distinct[k]["result"]["after"]["accuracy"]["overall"])
        x = np.arange(len(order))
        for offset, when, color, label in ((-0.2, "before", "tab:gray", "right after the cut"),
                                           (0.2, "after", "tab:blue",
                                            f"after {results['settings']['finetune_steps']} steps")):
            ax.bar(x + offset, [distinct[k]["result"][when]["accuracy"]["overall"] for k in order], 0.4,
                   color=color, label=label)
        ax.axhline(results["unpruned"]["accuracy"]["overall"], color="black", linestyle="--", linewidth=1,
                   label="unpruned")
        ax.set_xticks(x, ["blocks " + ",".join(map(str, k)) + "\n" + "\n".join(distinct[k]["chosen_by"])
                          for k in order], fontsize=7)
        ax.set_ylabel("GenEval-lite overall")
        ax.set_ylim(0, 1)
        every = len(order) == math.comb(results["depth"], size["keep"])
        ax.set_title(f"{results['depth']} -> {size['keep']} blocks: {'every cut' if every else 'the cuts'} scored")
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    blocks = np.arange(results["depth"])
    ax.bar(blocks - 0.2, results["importance"]["on_latents"], 0.4, label="on noised training latents")
    ax.bar(blocks + 0.2, results["importance"]["on_samples"], 0.4, label="on the sampling path")
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel("block importance (1 - cosine)")
    ax.set_title(f"importance (Spearman {results['importance']['rank_correlation']:.2f})")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    s = settings()
    model_dir = Path(_MODEL.value)
    if not _MODEL.value or not (model_dir / checkpoint.CONFIG_FILE).is_file():
        fail(f"--model={_MODEL.value!r}: expected a checkpoint directory holding {checkpoint.CONFIG_FILE}")
    data, sampler = recorded_settings(str(model_dir))
    model_config, params = checkpoint.load(model_dir)
    if model_config.depth < 2:
        fail(f"--model={_MODEL.value!r} has {model_config.depth} block; pruning needs at least 2")
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    cached = workdir / "unpruned.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        unpruned, importance = saved["unpruned"], saved["importance"]
    else:
        unpruned = score(params, model_config, data, sampler, s)
        importance = importances(params, model_config, data, sampler, s, _CONFIG.value.batch_size)
        cached.write_text(json.dumps({"unpruned": unpruned, "importance": importance}) + "\n")
    importance["rank_correlation"] = rank_correlation(importance["on_latents"], importance["on_samples"])

    results = {"model": str(model_dir), "depth": model_config.depth, "settings": s, "sampler": sampler,
               "unpruned": unpruned, "importance": importance, "cuts": {},
               "device": jax.devices()[0].device_kind}
    for fraction in s["fractions"]:
        keep = max(1, model_config.depth - math.ceil(fraction * model_config.depth - 1e-9))
        arms = cuts(model_config.depth, keep, importance, s["random_cuts"], _SEED.value)
        scored = {}
        for blocks in dict.fromkeys(arms.values()):  # each distinct cut once, in arm order
            folder = workdir / f"cut{fraction:g}" / f"keep_{'_'.join(map(str, blocks))}"
            scored[blocks] = run_cut(folder, blocks, params, model_config, data, sampler, s)
        results["cuts"][f"cut {fraction:g}"] = {"fraction": fraction, "keep": keep,
                                                "arms": {name: scored[blocks] for name, blocks in arms.items()}}

    out = Path(_OUT_JSON.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    Path(_OUT_PNG.value).parent.mkdir(parents=True, exist_ok=True)
    plot(results, Path(_OUT_PNG.value))

    tasks = list(unpruned["accuracy"])[1:]
    print(f"unpruned ({model_config.depth} blocks): {unpruned['accuracy']['overall']:.3f}")
    print(f"importance on latents: {np.round(importance['on_latents'], 4).tolist()}")
    print(f"importance on samples: {np.round(importance['on_samples'], 4).tolist()} "
          f"(Spearman {importance['rank_correlation']:.2f})")
    for name, size in results["cuts"].items():
        print(f"\n{name}: {model_config.depth} -> {size['keep']} blocks")
        print(f"| arm | kept | after the cut | after {s['finetune_steps']} steps | " + " | ".join(tasks) + " |")
        print("|---|---|---|---|" + "---|" * len(tasks))
        for arm, r in size["arms"].items():
            after = r["after"]["accuracy"]
            print(f"| {arm} | {r['kept']} | {r['before']['accuracy']['overall']:.3f} | {after['overall']:.3f} | "
                  + " | ".join(f"{after[t]:.2f}" for t in tasks) + " |")
    print(f"\nwrote {out} and {_OUT_PNG.value}")


if __name__ == "__main__":
    use_compilation_cache()
    app.run(main)

"""SANA 1.5's model growth in miniature, in accuracy: a trained shallow model grown deeper against the deep model
trained from scratch with the same training compute, over several seeds.

Per seed (--seeds), every arm a trainer run in --workdir/seed<k>/<arm>, so a rerun resumes or skips finished arms:
  base                  the --config's base stage (configs/grow.py: configs/pretrain.py's 4-block model);
  <strategy>            that base grown to the target depth with each of --strategies (`surgery.grow`:
                        partial_preservation, cyclic, block_expand) and trained on by --config's grown stage
                        (its optimizer state carried over or fresh, as the config says);
  continued             the control: the base not grown, trained on by the same grown-stage recipe (optimizer,
                        learning rate, steps), so that growth's own effect is told apart from the continuation's;
  scratch               the target-depth model trained from scratch with the base's recipe for as many
                        block-steps (steps x depth, the compute unit) as base + grown stage together.
Every run samples the trainer's evaluation grid (--grid_prompts, one sample each) and computes the held-out loss
--curve_points times, which gives accuracy and loss over compute; every final model is scored with GenEval-lite
(`sana_jax.evaluation`, per task). Across seeds: means with t-intervals at 95 %.

  python tools/experiments/growth_experiment.py --workdir=workdir/growth_experiment

Writes --out_json and --out_png and prints markdown tables.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jax
import numpy as np
import scipy.stats
from absl import app, flags, logging
from matplotlib.figure import Figure
from ml_collections import ConfigDict, config_flags

from sana_jax import checkpoint, evaluation
from sana_jax.cli import fail, use_compilation_cache
from sana_jax.sample import recorded_settings
from sana_jax.surgery import STRATEGIES
from sana_jax.trainer import run, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grow.py", "a growth config with a `base` section: the "
                                          "grown arms' recipe (the scratch arm trains with the base's)",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/growth_experiment", "one folder per seed and arm")
_SEEDS = flags.DEFINE_integer("seeds", 3, "training seeds (data order, initialisation, noise)")
_STRATEGIES = flags.DEFINE_list("strategies", list(STRATEGIES), "growth strategies, one arm each")
_CURVE_POINTS = flags.DEFINE_integer("curve_points", 4, "grid samplings and held-out losses per base and scratch "
                                     "run (besides step 0); the grown stage gets half as many")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 2700, "training steps of every seed's base (a fixed count, where "
                                   "configs/grow.py's base trains for a time budget: arms compare at equal steps)")
_GRID_PROMPTS = flags.DEFINE_integer("grid_prompts", 120, "prompts of the trainer's evaluation grid")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 300, "GenEval-lite prompts of the final scores")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 2, "samples per final GenEval-lite prompt")
_QUICK = flags.DEFINE_bool("quick", False, "a few minutes' smoke run: one seed, a 2-block base grown to 4 blocks, "
                           "a few steps, 12 prompts, scanned blocks and whole batches (which compile fastest)")
_OUT_JSON = flags.DEFINE_string("out_json", "docs/growth.json", "where the numbers go")
_OUT_PNG = flags.DEFINE_string("out_png", "docs/growth.png", "where the figure goes")

QUICK_MODEL = {"unroll_blocks": False, "batch_splits": 1}  # --quick's loop and batch: the same numbers
CONTINUED = "continued"  # the base trained on by the grown stage's recipe without growing
ARM_COLORS = {"base": "tab:blue", "scratch": "tab:gray", "partial_preservation": "tab:orange", "cyclic": "tab:green",
              "block_expand": "tab:purple", CONTINUED: "tab:red"}


def arms_from_base(settings: dict) -> list[str]:
    """The arms that start from the trained base: the grown ones and the continued control."""
    return [*settings["strategies"], CONTINUED]


def arm_depth(config: ConfigDict) -> int:
    """The depth an arm trains at: its growth target, or its own model's depth."""
    return config.growth.target_depth if config.get("growth") else config.model.overrides["depth"]


def settings() -> dict:
    """The run's settings: the flags, with --quick's reductions applied."""
    s = {"seeds": _SEEDS.value, "strategies": list(_STRATEGIES.value), "curve_points": _CURVE_POINTS.value,
         "base_steps": _BASE_STEPS.value,
         "grid_prompts": _GRID_PROMPTS.value, "num_prompts": _NUM_PROMPTS.value, "samples_per_prompt": _SAMPLES.value}
    bad = [name for name in s["strategies"] if name not in STRATEGIES]
    if bad:
        fail(f"--strategies={','.join(s['strategies'])}: {bad[0]!r} is not one of {', '.join(STRATEGIES)}")
    if _QUICK.value:
        s.update(seeds=1, base_steps=4, curve_points=2, grid_prompts=6, num_prompts=12, samples_per_prompt=1)
    if min(s["seeds"], s["curve_points"], s["base_steps"]) < 1:
        fail(f"--seeds={s['seeds']}, --curve_points={s['curve_points']} and --base_steps={s['base_steps']}: "
             "expected at least 1 each")
    return s


def arm_configs(grow: ConfigDict, seed: int, s: dict, quick: bool) -> dict[str, ConfigDict]:
    """The runs of one seed: {"base", <strategy>..., "continued", "scratch"}."""
    if grow.get("growth") is None or grow.get("base") is None:
        fail("--config: expected a growth config with `growth` and `base` sections, like configs/grow.py")
    base = copy.deepcopy(grow.base)
    base.update({"steps": s["base_steps"], "time_budget_s": 0.0})
    if quick:
        base.model.overrides = {**base.model.overrides, "depth": 2, **QUICK_MODEL}
        base.update({"batch_size": 8, "eval_batches": 1})
    base.seed = seed
    base.sampling.num_prompts = s["grid_prompts"]
    base.sample_every = base.eval_every = max(1, base.steps // s["curve_points"])

    target = 4 if quick else grow.growth.target_depth
    grown_steps = 2 if quick else grow.steps

    def after_base(strategy: str, depth: int) -> ConfigDict:
        c = copy.deepcopy(grow)
        c.base = copy.deepcopy(base)
        c.growth.update({"strategy": strategy, "target_depth": depth, "base_checkpoint": ""})
        c.steps = grown_steps
        if quick:
            c.model.overrides = {**c.model.overrides, **QUICK_MODEL}
            c.update({"batch_size": 8, "eval_batches": 1})
            c.optimizer.warmup_steps = 1
        c.seed = seed
        c.sampling.num_prompts = s["grid_prompts"]
        c.sample_every = c.eval_every = max(1, c.steps // max(1, s["curve_points"] // 2))
        return c

    configs = {"base": base, **{strategy: after_base(strategy, target) for strategy in s["strategies"]}}
    # Partial preservation to the base's own depth adds no block: the same model, trained on by the same recipe.
    configs[CONTINUED] = after_base("partial_preservation", base.model.overrides["depth"])

    scratch = copy.deepcopy(base)
    scratch.steps = math.ceil((base.steps * base.model.overrides["depth"] + grown_steps * target) / target)
    scratch.model.overrides = {**base.model.overrides, "depth": target}
    scratch.sample_every = scratch.eval_every = max(1, scratch.steps // s["curve_points"])
    configs["scratch"] = scratch
    return configs


def read_curves(workdir: Path) -> dict[str, list]:
    """A run's held-out loss and grid accuracy from its metrics.jsonl: {name: [(step, value), ...]}."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {name: [(r["step"], r[name]) for r in rows if name in r] for name in ("eval_loss", "sample_accuracy")}


def final_scores(folder: Path, s: dict) -> dict:
    """GenEval-lite of a run's final model with its recorded sampler (saved in `folder`, reused when present)."""
    done = folder / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    model_config, params = checkpoint.load(folder / "model")
    data, sampler = recorded_settings(str(folder / "model"))
    result = evaluation.evaluate(params, model_config, data, num_prompts=s["num_prompts"],
                                 seed=_CONFIG.value.sampling.eval_seed, samples_per_prompt=s["samples_per_prompt"],
                                 **sampler)
    scores = {"accuracy": result.accuracy(), "counts": result.counts()}
    done.write_text(json.dumps(scores) + "\n")
    return scores


def mean_interval(values: list[float]) -> dict:
    """Mean over seeds and its 95 % t-interval (the mean itself for one seed)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean, "values": values.tolist()}
    half = float(scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": values.tolist()}


def first_reach(compute: np.ndarray, values: np.ndarray, level: float) -> float | None:
    """The compute at which a rising curve first reaches `level` (linear between points), or None."""
    for i, value in enumerate(values):
        if value >= level:
            if i == 0:
                return float(compute[0])
            c0, c1, v0 = compute[i - 1], compute[i], values[i - 1]
            return float(c0 + (c1 - c0) * (level - v0) / (value - v0))
    return None


def paired_differences(results: dict) -> dict[str, dict]:
    """Seed-paired differences of final overall accuracy and held-out loss, with t-intervals: every grown arm
    against scratch, the base and the continued base, the continued base against the base, and the other
    strategies against partial preservation."""
    strategies = results["settings"]["strategies"]
    pairs = [(arm, other) for arm in strategies for other in ("scratch", "base", CONTINUED)]
    pairs.append((CONTINUED, "base"))
    if "partial_preservation" in strategies:
        pairs += [("partial_preservation", arm) for arm in strategies if arm != "partial_preservation"]
    final = results["final"]
    return {f"{a} - {b}": {metric: mean_interval(np.subtract(final[a][metric]["values"], final[b][metric]["values"]))
                           for metric in ("overall", "final_eval_loss")} for a, b in pairs}


def arm_path(results: dict, arm: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """An arm's seed-mean curve of `metric` over compute; a grown (or continued) arm's path is its base's, then
    its own from the model right after the surgery (at the base's final compute)."""
    curve = results["curves"][arm]
    compute, values = np.asarray(curve["compute"]), np.asarray(curve[metric])
    if arm in arms_from_base(results["settings"]):
        base = results["curves"]["base"]
        return np.concatenate([base["compute"], compute]), np.concatenate([base[metric], values])
    return compute, values


def compute_savings(results: dict) -> list[dict]:
    """For each grown arm: where its path and scratch's first reach the other's final grid accuracy."""
    rows = []
    scratch_compute, scratch_accuracy = arm_path(results, "scratch", "sample_accuracy")
    for arm in results["settings"]["strategies"]:
        compute, accuracy = arm_path(results, arm, "sample_accuracy")
        rows.append({"arm": arm, "final": float(accuracy[-1]), "scratch_final": float(scratch_accuracy[-1]),
                     "arm_reaches_scratch_final_at": first_reach(compute, accuracy, scratch_accuracy[-1]),
                     "scratch_reaches_arm_final_at": first_reach(scratch_compute, scratch_accuracy, accuracy[-1]),
                     "budget": float(compute[-1])})
    return rows


def plot(results: dict, path: Path) -> None:
    """Held-out loss and grid accuracy over compute (seed means), the final GenEval-lite per task (seed means)
    and the seed-paired differences of overall accuracy."""
    fig = Figure(figsize=(20, 4.6), layout="constrained")
    ax_loss, ax_accuracy, ax_tasks, ax_paired = fig.subplots(1, 4, width_ratios=(1, 1, 1.3, 0.9))
    depths, seeds = results["depths"], results["settings"]["seeds"]
    over_seeds = f"mean of {seeds} seed{'s' * (seeds > 1)}"
    for arm in results["final"]:
        label = {"base": f"{depths['base']}-block base", "scratch": f"{depths['target']} blocks from scratch",
                 CONTINUED: f"{depths['base']}-block base continued, not grown"}.get(
            arm, f"grown to {depths['target']}: {arm}")
        for ax, metric in ((ax_loss, "eval_loss"), (ax_accuracy, "sample_accuracy")):
            compute, values = arm_path(results, arm, metric)
            ax.plot(compute, values, "o-", ms=3, color=ARM_COLORS[arm], label=label)
    losses = [v for arm in results["final"] for c, v in zip(*arm_path(results, arm, "eval_loss"), strict=True) if c]
    ax_loss.set(xlabel="training compute (block-steps)", ylabel="held-out loss",
                ylim=(min(losses) * 0.97, max(losses) * 1.03), title=f"held-out loss ({over_seeds})")
    ax_accuracy.set(xlabel="training compute (block-steps)", ylabel="GenEval-lite on the training grid",
                    title=f"accuracy over compute ({results['settings']['grid_prompts']} prompts, {over_seeds})")
    ax_accuracy.legend(fontsize=7)

    arms = list(results["final"])
    tasks = ["overall", *results["tasks"]]
    width = 0.8 / len(arms)
    x = np.arange(len(tasks))
    for i, arm in enumerate(arms):
        ax_tasks.bar(x + (i - (len(arms) - 1) / 2) * width, [results["final"][arm][t]["mean"] for t in tasks], width,
                     color=ARM_COLORS[arm], label=arm)
    ax_tasks.set_xticks(x, [t.replace("_", "\n") for t in tasks], fontsize=8)
    ax_tasks.set(ylabel="GenEval-lite accuracy", ylim=(0, 1),
                 title=f"final models ({results['settings']['num_prompts']} prompts x "
                       f"{results['settings']['samples_per_prompt']}, {over_seeds})")
    ax_tasks.legend(fontsize=7, ncols=3)

    pairs = list(results["paired"])
    diffs = [results["paired"][pair]["overall"] for pair in pairs]
    y = np.arange(len(pairs))[::-1]
    ax_paired.errorbar([d["mean"] for d in diffs], y, fmt="o", capsize=3, color="black",
                       xerr=[[d["mean"] - d["low"] for d in diffs], [d["high"] - d["mean"] for d in diffs]])
    ax_paired.axvline(0, color="gray", linewidth=1)
    ax_paired.set_yticks(y, [pair.replace("partial_preservation", "partial pres.") for pair in pairs], fontsize=7)
    ax_paired.set(xlabel="difference in overall GenEval-lite", title="paired by seed (95 % t-intervals)")
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    s = settings()
    workdir = Path(_WORKDIR.value)
    per_seed = [arm_configs(_CONFIG.value, seed, s, _QUICK.value) for seed in range(s["seeds"])]
    for seed, configs in enumerate(per_seed):
        seed_dir = workdir / f"seed{seed}"
        for arm, config in configs.items():
            folder = seed_dir / arm
            if arm in arms_from_base(s):  # these continue from the shared base (and its optimizer state)
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "base").exists():
                    (folder / "base").symlink_to(Path("..") / "base", target_is_directory=True)
                run(config, folder)
            else:
                train(config, folder, stage=f"seed {seed}: {arm}")
            final_scores(folder, s)

    configs = per_seed[0]
    base_depth = configs["base"].model.overrides["depth"]
    target = configs["scratch"].model.overrides["depth"]
    results = {"settings": s, "depths": {"base": base_depth, "target": target},
               "steps": {arm: c.steps for arm, c in configs.items()}, "curves": {}, "final": {},
               "device": jax.devices()[0].device_kind}
    for arm in configs:
        runs = [read_curves(workdir / f"seed{seed}" / arm) for seed in range(s["seeds"])]
        steps = [step for step, _ in runs[0]["sample_accuracy"]]
        depth = arm_depth(configs[arm])
        offset = configs["base"].steps * base_depth if arm in arms_from_base(s) else 0
        results["curves"][arm] = {
            "steps": steps, "compute": [offset + step * depth for step in steps],
            **{metric: np.mean([[v for _, v in r[metric]] for r in runs], axis=0).tolist()
               for metric in ("eval_loss", "sample_accuracy")}}
        scores = [final_scores(workdir / f"seed{seed}" / arm, s) for seed in range(s["seeds"])]
        tasks = list(scores[0]["accuracy"])
        results["final"][arm] = {task: mean_interval([sc["accuracy"][task] for sc in scores]) for task in tasks}
        results["final"][arm]["final_eval_loss"] = mean_interval([r["eval_loss"][-1][1] for r in runs])
        results["tasks"] = tasks[1:]
    results["savings"] = compute_savings(results)
    results["paired"] = paired_differences(results)

    out = Path(_OUT_JSON.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    Path(_OUT_PNG.value).parent.mkdir(parents=True, exist_ok=True)
    plot(results, Path(_OUT_PNG.value))

    print("\n| arm | depth | steps | compute (block-steps) | held-out loss | GenEval-lite overall (95 % CI) | "
          + " | ".join(results["tasks"]) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(results["tasks"]))
    for arm, final in results["final"].items():
        curve = results["curves"][arm]
        overall = final["overall"]
        print(f"| {arm} | {arm_depth(configs[arm])} | {results['steps'][arm]} | "
              f"{curve['compute'][-1]} | {final['final_eval_loss']['mean']:.4f} | {overall['mean']:.3f} "
              f"({overall['low']:.3f}-{overall['high']:.3f}) | "
              + " | ".join(f"{final[t]['mean']:.2f}" for t in results["tasks"]) + " |")
    print("\n| paired by seed | overall accuracy difference (95 % CI) | held-out loss difference (95 % CI) |")
    print("|---|---|---|")
    for pair, diff in results["paired"].items():
        print(f"| {pair} | " + " | ".join(f"{diff[m]['mean']:+.3f} ({diff[m]['low']:+.3f} to {diff[m]['high']:+.3f})"
                                          for m in ("overall", "final_eval_loss")) + " |")
    for row in results["savings"]:
        reach, back = row["arm_reaches_scratch_final_at"], row["scratch_reaches_arm_final_at"]
        print(f"{row['arm']}: grid accuracy {row['final']:.3f} (scratch {row['scratch_final']:.3f}); reaches "
              f"scratch's final at " + (f"{reach:.0f} of {row['budget']:.0f} block-steps" if reach is not None
                                        else "no point")
              + "; scratch reaches its final at " + (f"{back:.0f}" if back is not None else "no point"))
    print(f"\nwrote {out} and {_OUT_PNG.value}")


if __name__ == "__main__":
    use_compilation_cache()
    app.run(main)

"""SANA 1.5's two training-time claims, in miniature on the shapes domain, measured and plotted.

1. Growth: a trained 4-block model (configs/pretrain.py) grown to 8 blocks by partial preservation and
   trained on reaches a given held-out loss with less total compute than the 8-block model trained from
   scratch with the same total budget (compute counted in block-steps: steps x depth).
2. Pruning: an 8-block model cut back by block importance and fine-tuned for 100 steps keeps more of its
   quality than the same cut made at random (three seeds) or from the end. The model pruned is the one
   trained from scratch (`--prune_from`), whose blocks are all trained: after 750 steps the grown model's
   added blocks are still close to the identities they started as, so any cut that keeps the preserved
   blocks is as good as another.

Every arm is a run of the trainer (`sana_jax.trainer.run`) in its own folder under --workdir, so re-running
resumes or skips finished arms. Writes docs/growth.png, docs/growth.json and prints markdown tables.

  python tools/experiments/growth_experiment.py --workdir=workdir/growth_experiment
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure
from ml_collections import ConfigDict, config_flags

from sana_jax import checkpoint
from sana_jax.data.pipeline import DataConfig, make_train_iterator
from sana_jax.surgery import block_importance_per_timestep
from sana_jax.trainer import run
from sana_jax.trainer.config import growth_defaults, prune_defaults
from sana_jax.trainer.loop import sample_and_score

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "the base model's training config",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/growth_experiment", "one folder per arm")
_OUT = flags.DEFINE_string("out", "docs", "where growth.png and growth.json go")
_GROWN_DEPTH = flags.DEFINE_integer("grown_depth", 8, "depth of the grown and the scratch model")
_GROWN_STEPS = flags.DEFINE_integer("grown_steps", 750, "steps after growth")
_GROWN_LRS = flags.DEFINE_list("grown_lrs", ["1e-3", "3e-4"], "peak learning rates after growth, one arm each "
                               "(the first one's model is the one pruned)")
_PRUNED_DEPTH = flags.DEFINE_integer("pruned_depth", 4, "depth after pruning")
_PRUNE_FROM = flags.DEFINE_enum("prune_from", "scratch", ["scratch", "grown"], "the model to prune")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 100, "fine-tuning steps after pruning")
_EVAL_PROMPTS = flags.DEFINE_integer("eval_prompts", 64, "prompts for the final checker accuracy")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "guidance scale of the final samples")

PRUNE_ARMS = (("importance", 0), ("last", 0), ("random", 0), ("random", 1), ("random", 2))  # (method, seed)


def arm_configs(pretrain: ConfigDict, grown_depth: int, grown_steps: int, grown_lrs: list[float], pruned_depth: int,
                finetune_steps: int, prune_from: str, workdir: Path) -> dict[str, ConfigDict]:
    """The runs: base, grown (from base; one per learning rate), scratch (the same total block-steps) and one
    prune of `prune_from` per method and seed. Arms are named "base", "grown", "grown_lr<lr>", "scratch" and
    "prune_<method><seed>"."""
    base = copy.deepcopy(pretrain)
    base.sample_every = 0
    base.sampling.num_prompts = 0
    base.eval_every = 125

    configs = {"base": base}
    for index, lr in enumerate(grown_lrs):
        grown = copy.deepcopy(pretrain)
        grown.update({"steps": grown_steps, "sample_every": 0, "eval_every": 125})
        grown.sampling.num_prompts = 0
        grown.optimizer.update({"lr": lr, "warmup_steps": 40})
        grown.growth = growth_defaults()
        grown.growth.update({"target_depth": grown_depth, "strategy": "partial_preservation",
                             "base_checkpoint": str(workdir / "base" / "model")})
        configs["grown" if index == 0 else f"grown_lr{lr:g}"] = grown

    base_depth = base.model.overrides["depth"]
    scratch = copy.deepcopy(pretrain)
    scratch.update({"sample_every": 0, "eval_every": 125,
                    "steps": base.steps * base_depth // grown_depth + grown_steps})
    scratch.sampling.num_prompts = 0
    scratch.model.overrides = {**scratch.model.overrides, "depth": grown_depth}

    configs["scratch"] = scratch
    for method, seed in PRUNE_ARMS:
        c = copy.deepcopy(pretrain)
        c.update({"steps": finetune_steps, "sample_every": 0, "eval_every": 25, "log_every": 25, "seed": seed})
        c.sampling.num_prompts = 0
        c.optimizer.update({"lr": 3e-4, "warmup_steps": 10})
        c.prune = prune_defaults()
        c.prune.update({"target_depth": pruned_depth, "method": method,
                        "base_checkpoint": str(workdir / prune_from / "model")})
        configs[f"prune_{method}{seed}"] = c
    return configs


def read_metric(workdir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if name in r]
    return np.array([r["step"] for r in rows]), np.array([r[name] for r in rows])


def final_accuracy(model_dir: Path, config: ConfigDict, num_prompts: int, guidance: float) -> float:
    """Checker accuracy of one sample per evaluation prompt (and a grid PNG next to the model)."""
    model_config, params = checkpoint.load(model_dir)
    sampling = ConfigDict({**config.sampling.to_dict(), "num_prompts": num_prompts, "guidance_scale": guidance})
    scores = sample_and_score(params, model_config, DataConfig.from_mapping(config.data), sampling,
                              model_dir.parent / "final_samples.png", title=str(model_dir.parent.name))
    return scores["sample_accuracy"]


def plot(results: dict, path: Path) -> None:
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_growth, ax_importance, ax_prune = fig.subplots(1, 3, width_ratios=(1.3, 1, 1))

    colors = iter(("tab:orange", "tab:red", "tab:purple", "tab:brown"))
    for name, curve in results["curves"].items():
        if name == "scratch":
            label, color = f"{results['grown_depth']} blocks from scratch (lr {curve['lr']:g})", "tab:gray"
        elif name == "base":
            label, color = f"{results['base_depth']}-block base (lr {curve['lr']:g})", "tab:blue"
        else:
            label, color = f"grown to {results['grown_depth']} blocks, lr {curve['lr']:g}", next(colors)
        ax_growth.plot(curve["compute"], curve["eval_loss"], "o-", ms=3, color=color, label=label)
    ax_growth.set(xlabel=f"training compute ({results['grown_depth']}-block steps)", ylabel="held-out loss",
                  title="growth vs training from scratch")
    losses = [loss for c in results["curves"].values() for loss in c["eval_loss"][1:]]
    ax_growth.set_ylim(min(losses) * 0.95, np.percentile(losses, 90))
    ax_growth.legend(fontsize=8)

    blocks = np.arange(results["grown_depth"])
    for offset, (name, color) in zip((-0.2, 0.2), (("grown", "tab:orange"), ("scratch", "tab:gray")), strict=True):
        ax_importance.bar(blocks + offset, np.mean(results["importance_per_timestep"][name], axis=0), 0.4,
                          color=color, label=f"{name} (blocks {results['base_depth']}+ added)" if name == "grown"
                          else "from scratch")
    ax_importance.set_yscale("log")
    ax_importance.set(xlabel="block", ylabel="block importance (1 - cos)", title="block importance, 8-block models")
    ax_importance.legend(fontsize=8)

    names = list(results["prune"])
    x = np.arange(len(names))
    before = [results["prune"][n]["loss_before"] for n in names]
    after = [results["prune"][n]["loss_after"] for n in names]
    ax_prune.bar(x - 0.2, before, 0.4, label="after pruning", color="tab:red")
    ax_prune.bar(x + 0.2, after, 0.4, label=f"after {results['finetune_steps']} fine-tuning steps", color="tab:green")
    ax_prune.axhline(results["unpruned_loss"], color="black", ls="--", lw=1, label="unpruned")
    ax_prune.set_xticks(x, [f"{n}\n{results['prune'][n]['kept']}" for n in names], fontsize=7)
    ax_prune.set_yscale("log")
    ax_prune.set(ylabel="held-out loss", title=f"pruning the {results['prune_from']} model: "
                 f"{results['grown_depth']} -> {results['pruned_depth']} blocks")
    ax_prune.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(_WORKDIR.value)
    grown_lrs = [float(lr) for lr in _GROWN_LRS.value]
    configs = arm_configs(_CONFIG.value, _GROWN_DEPTH.value, _GROWN_STEPS.value, grown_lrs, _PRUNED_DEPTH.value,
                          _FINETUNE_STEPS.value, _PRUNE_FROM.value, workdir)
    grown_arms = [name for name in configs if name.startswith("grown")]
    for name, config in configs.items():
        run(config, workdir / name)

    base_depth = configs["base"].model.overrides["depth"]
    grown_depth = _GROWN_DEPTH.value
    curves = {}
    arms = [("base", base_depth, 0), ("scratch", grown_depth, 0)]
    arms += [(name, grown_depth, configs["base"].steps * base_depth) for name in grown_arms]
    for name, depth, offset in arms:
        steps, losses = read_metric(workdir / name, "eval_loss")
        curves[name] = {"steps": steps.tolist(), "eval_loss": losses.tolist(),
                        "compute": ((offset + steps * depth) / grown_depth).tolist(),
                        "lr": configs[name].optimizer.lr}

    data = DataConfig.from_mapping({**configs["grown"].data.to_dict(), "caption_dropout": 0.0})
    iterator = make_train_iterator(data, seed=7, batch_size=16, process_index=0, process_count=1)
    calibration = [next(iterator) for _ in range(4)]
    timesteps = prune_defaults().timesteps
    importance = {}
    for name in ("grown", "scratch"):
        model_config, params = checkpoint.load(workdir / name / "model")
        importance[name] = block_importance_per_timestep(params, model_config, calibration,
                                                         timesteps=timesteps).tolist()

    prune = {}
    for method, seed in PRUNE_ARMS:
        name = f"{method}{seed}"
        steps, losses = read_metric(workdir / f"prune_{name}", "eval_loss")
        surgery_record = json.loads((workdir / f"prune_{name}" / "surgery.json").read_text())
        prune[name] = {"method": method, "seed": seed, "kept": surgery_record["kept_blocks"],
                       "loss_before": float(losses[0]), "loss_after": float(losses[-1]), "curve": losses.tolist()}

    accuracy = {name: final_accuracy(workdir / name / "model", configs[name], _EVAL_PROMPTS.value, _GUIDANCE.value)
                for name in configs}
    results = {"base_depth": base_depth, "grown_depth": grown_depth, "pruned_depth": _PRUNED_DEPTH.value,
               "finetune_steps": _FINETUNE_STEPS.value, "curves": curves,
               "prune_from": _PRUNE_FROM.value, "unpruned_loss": curves[_PRUNE_FROM.value]["eval_loss"][-1],
               "importance_per_timestep": importance,
               "timesteps": list(timesteps), "prune": prune, "checker_accuracy": accuracy,
               "checker_prompts": _EVAL_PROMPTS.value, "guidance": _GUIDANCE.value,
               "device": jax.devices()[0].device_kind}
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "growth.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "growth.png")

    budget = curves["scratch"]["compute"][-1]
    print(f"\n| run | depth | steps | compute ({grown_depth}-block steps) | held-out loss | checker accuracy |")
    print("|---|---|---|---|---|---|")
    for name, depth, _ in arms:
        c = curves[name]
        print(f"| {name} (lr {c['lr']:g}) | {depth} | {c['steps'][-1]} | {c['compute'][-1]:.0f} | "
              f"{c['eval_loss'][-1]:.4f} | {accuracy[name]:.3f} |")
    scratch_curve = list(zip(curves["scratch"]["compute"], curves["scratch"]["eval_loss"], strict=True))
    for name in grown_arms:
        for x, loss in zip(curves[name]["compute"], curves[name]["eval_loss"], strict=True):
            matched = [cx for cx, cl in scratch_curve if cl <= loss]
            print(f"{name}: loss {loss:.4f} at {x:.0f} units; scratch first reaches it at "
                  + (f"{matched[0]:.0f} units" if matched else "no point within its budget"))
    print(f"(budget: {budget:.0f} units)")
    print(f"\n| pruning method | kept blocks | loss after pruning | after {_FINETUNE_STEPS.value} steps | "
          "checker accuracy |")
    print("|---|---|---|---|---|")
    for name, p in prune.items():
        print(f"| {name} | {p['kept']} | {p['loss_before']:.4f} | {p['loss_after']:.4f} | "
              f"{accuracy[f'prune_{name}']:.3f} |")
    print(f"\nunpruned {_PRUNE_FROM.value} model: {results['unpruned_loss']:.4f}")
    for name, table in importance.items():
        print(f"importance per block, {name}: {np.round(np.mean(table, axis=0), 4).tolist()}")


if __name__ == "__main__":
    app.run(main)

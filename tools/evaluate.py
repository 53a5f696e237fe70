"""GenEval-lite accuracy of a saved model on the shapes domain, per task, with 95 % intervals.

  python tools/evaluate.py --model=workdir/grow/model [--num_prompts=120 --samples_per_prompt=4]

The sampler defaults to the one recorded in the model's metadata (what the trainer evaluated with);
any of --num_steps, --guidance_scale, --shift, --solver overrides it. A second table says why samples were
rejected (`sana_jax.data.checker.FAILURES`). With --out=DIR it also writes report.json (settings, per-task counts
and failures, every verdict) and grid.png (the first samples with verdicts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging

from sana_jax import checkpoint, cli, evaluation, sampling
from sana_jax.grids import save_grid
from sana_jax.sample import recorded_settings

_MODEL = flags.DEFINE_string("model", None, "a sana_jax.checkpoint directory, e.g. a workdir's model/")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 120, "evaluation prompts (the six tasks in turn)")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 4, "independent samples judged per prompt")
_SEED = flags.DEFINE_integer("seed", 1234, "seed of the prompts and the noise")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sampler steps (default: the model's metadata)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "classifier-free guidance (default: metadata)")
_SHIFT = flags.DEFINE_float("shift", None, "sampling shift (default: metadata)")
_SOLVER = flags.DEFINE_string("solver", None, f"one of {sampling.SOLVERS} (default: metadata)")
_OUT = flags.DEFINE_string("out", None, "optional directory for report.json and grid.png")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _MODEL.value or not Path(_MODEL.value, checkpoint.CONFIG_FILE).is_file():
        raise app.UsageError(f"--model={_MODEL.value}: expected a checkpoint directory holding "
                             f"{checkpoint.CONFIG_FILE}")
    logging.set_verbosity(logging.WARNING)
    if _NUM_PROMPTS.value < 1 or _SAMPLES.value < 1:
        raise app.UsageError(f"--num_prompts={_NUM_PROMPTS.value} --samples_per_prompt={_SAMPLES.value}: "
                             "expected positive integers")
    data, sampler = recorded_settings(_MODEL.value, num_steps=_NUM_STEPS.value, guidance_scale=_GUIDANCE.value,
                                      shift=_SHIFT.value, solver=_SOLVER.value)
    config, params = checkpoint.load(_MODEL.value)
    result = evaluation.evaluate(params, config, data, num_prompts=_NUM_PROMPTS.value, seed=_SEED.value,
                                 samples_per_prompt=_SAMPLES.value, **sampler)
    settings = ", ".join(f"{k}={v}" for k, v in sampler.items())
    print(f"{_MODEL.value}: {_NUM_PROMPTS.value} prompts x {_SAMPLES.value} samples ({settings})")
    print(result.table())
    print("\nWhy samples were rejected (clutter: stray pixels over 1 % of the image; missing: a named object, "
          "with its colour, not found; count: the wrong number; relation: both found, not in the relation):")
    print(result.failure_table())
    if _OUT.value:
        out = Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        report = {"model": _MODEL.value, "num_prompts": _NUM_PROMPTS.value, "samples_per_prompt": _SAMPLES.value,
                  "seed": _SEED.value, "sampling": sampler, "accuracy": result.accuracy(),
                  "counts": result.counts(),
                  "failures": result.failure_counts(),
                  "samples": [{"prompt": p, "ok": bool(v), "failure": f}
                              for p, v, f in zip(result.prompts, result.verdicts, result.failures, strict=True)]}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        n = min(len(result.prompts), 48)
        save_grid(out / "grid.png", result.images[:n], result.prompts[:n], verdicts=result.verdicts[:n],
                  title=f"GenEval-lite {result.accuracy()['overall']:.3f}")
        print(f"wrote {out / 'report.json'} and {out / 'grid.png'}", file=sys.stderr)


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    cli.use_compilation_cache()
    app.run(main)

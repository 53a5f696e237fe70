"""GenEval-lite: how often a model's samples satisfy their prompts on the shapes domain, per task.

The prompts are the domain's own (six GenEval tasks in turn, drawn with a seed of their own); each
sample is judged by the programmatic checker. The overall score is the mean of the task accuracies,
as GenEval reports it; intervals are Wilson score intervals at 95 %.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sana_jax.data import checker, shapes
from sana_jax.data.pipeline import DataConfig, make_autoencoder, make_text_encoder, null_caption
from sana_jax.model import SanaConfig
from sana_jax.sampling import generate


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a binomial proportion; (0, 1) for no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Samples and verdicts: `images` (N, H, W, 3) in [0, 1], `prompts` and `verdicts` of length N, and
    optionally why each rejected sample failed (`failures`: "" or one of `checker.FAILURES`)."""

    prompts: list[str]
    images: np.ndarray
    verdicts: list[bool]
    failures: list[str] | None = None

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per task in `shapes.TASKS` order (tasks without prompts left out): (accepted, judged)."""
        tasks = [shapes.parse_prompt(p).task for p in self.prompts]
        return {task: (sum(v for t, v in zip(tasks, self.verdicts, strict=True) if t == task), tasks.count(task))
                for task in shapes.TASKS if task in tasks}

    def accuracy(self) -> dict[str, float]:
        """{"overall": mean of the task accuracies, <task>: accuracy}."""
        per_task = {task: k / n for task, (k, n) in self.counts().items()}
        return {"overall": float(np.mean(list(per_task.values()))), **per_task}

    def overall_interval(self) -> tuple[float, float]:
        """95 % interval of the overall accuracy (the mean of K task accuracies, n_t prompts each).

        Wilson's interval at the mean's effective sample size K^2 / sum(1 / n_t), the size at which a single
        proportion has the mean's variance when the tasks' accuracies are alike. With equal task counts this
        is the pooled interval of all the samples.
        """
        counts = self.counts().values()
        effective = len(counts) ** 2 / sum(1 / n for _, n in counts)
        return wilson_interval(np.mean([k / n for k, n in counts]) * effective, effective)

    def failure_counts(self) -> dict[str, dict[str, int]]:
        """Per task (as in `counts`): how many samples were rejected for each of `checker.FAILURES`."""
        if self.failures is None:
            raise ValueError("this Evaluation has no failures recorded; `evaluate` records them")
        tasks = [shapes.parse_prompt(p).task for p in self.prompts]
        return {task: {kind: sum(t == task and f == kind for t, f in zip(tasks, self.failures, strict=True))
                       for kind in checker.FAILURES}
                for task in self.counts()}

    def failure_table(self) -> str:
        """A Markdown table: per task, the accepted samples and the rejected ones by reason."""
        rows = ["| task | accepted | " + " | ".join(checker.FAILURES) + " |",
                "|---|---|" + "---|" * len(checker.FAILURES)]
        per_task, counts = self.failure_counts(), self.counts()
        for task, kinds in per_task.items():
            k, n = counts[task]
            rows.append(f"| {task} | {k}/{n} | " + " | ".join(str(kinds[f]) for f in checker.FAILURES) + " |")
        totals = {f: sum(kinds[f] for kinds in per_task.values()) for f in checker.FAILURES}
        rows.append(f"| all | {sum(self.verdicts)}/{len(self.verdicts)} | "
                    + " | ".join(str(totals[f]) for f in checker.FAILURES) + " |")
        return "\n".join(rows)

    def table(self) -> str:
        """A Markdown table: task, accepted / judged, accuracy and its 95 % interval."""
        rows = ["| task | accepted | accuracy | 95 % interval |", "|---|---|---|---|"]
        for task, (k, n) in self.counts().items():
            low, high = wilson_interval(k, n)
            rows.append(f"| {task} | {k}/{n} | {k / n:.3f} | {low:.3f}-{high:.3f} |")
        low, high = self.overall_interval()
        rows.append(f"| overall (mean of tasks) | {sum(self.verdicts)}/{len(self.verdicts)} | "
                    f"{self.accuracy()['overall']:.3f} | {low:.3f}-{high:.3f} |")
        return "\n".join(rows)


def eval_prompts(data_config: DataConfig, num_prompts: int, seed: int) -> list[str]:
    """Fixed prompts of the shapes domain drawn with their own seed (the config's tasks in turn)."""
    return shapes.prompts(seed, num_prompts, tasks=data_config.tasks)


def sample_images(params: dict, model_config: SanaConfig, data_config: DataConfig, prompts: list[str], *,
                  key: jax.Array, num_steps: int, guidance_scale: float, shift: float, solver: str,
                  batch_size: int = 256) -> np.ndarray:
    """One image per prompt, `batch_size` prompts at a time (chunk i with noise from fold_in(key, i)).

    Returns (N, H, W, 3) float32 in [0, 1].
    """
    text_encoder = make_text_encoder(data_config)
    autoencoder = make_autoencoder(data_config)
    null_text, null_mask = null_caption(data_config, text_encoder)
    side = data_config.resolution // autoencoder.downsample
    chunks = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        text, mask = text_encoder.encode_text(prompts[start:start + batch_size])
        latents = generate(params, model_config, text, mask, null_text, null_mask, jax.random.fold_in(key, i),
                           height=side, width=side, num_steps=num_steps, guidance_scale=guidance_scale,
                           shift=shift, solver=solver)
        chunks.append(np.clip(np.asarray(autoencoder.decode(latents), np.float32), 0.0, 1.0))
    return np.concatenate(chunks)


def evaluate(params: dict, model_config: SanaConfig, data_config: DataConfig, *, num_prompts: int, seed: int,
             samples_per_prompt: int = 1, num_steps: int = 20, guidance_scale: float = 1.0, shift: float = 1.0,
             solver: str = "flow_dpm_solver", batch_size: int = 256) -> Evaluation:
    """Samples `samples_per_prompt` images for each of `num_prompts` evaluation prompts and judges them.

    Prompt i's samples are rows i, i + num_prompts, ... of the result; the noise comes from `seed`.
    """
    prompts = eval_prompts(data_config, num_prompts, seed) * samples_per_prompt
    images = sample_images(params, model_config, data_config, prompts, key=jax.random.key(seed),
                           num_steps=num_steps, guidance_scale=guidance_scale, shift=shift, solver=solver,
                           batch_size=batch_size)
    verdicts = [checker.check_detail(p, im) for p, im in zip(prompts, images, strict=True)]
    return Evaluation(prompts, images, [v.ok for v in verdicts], [v.failure for v in verdicts])

"""GenEval-lite: Wilson intervals against published values, per-task bookkeeping on renders with known
verdicts, and the trainer's per-task metrics and model metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import read_metrics, tiny_config

from sana_jax import checkpoint, evaluation
from sana_jax.data import checker, shapes
from sana_jax.sample import SAMPLING_DEFAULTS, parse_args


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # Wilson score intervals at z = 1.96 (Newcombe 1998, table I; Brown, Cai & DasGupta 2001).
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = evaluation.wilson_interval(k, n)
    np.testing.assert_allclose(got, (low, high), atol=1e-4)


def test_per_task_counts_on_renders_with_known_verdicts():
    # Ground-truth renders satisfy their own prompts; an empty background satisfies none.
    samples = [shapes.make_sample(3, i) for i in range(12)]  # every task twice
    blank = np.full_like(samples[0].image, 230)
    images = np.stack([s.image for s in samples[:6]] + [blank] * 6) / 255.0
    prompts = [s.prompt for s in samples]
    details = [checker.check_detail(p, im) for p, im in zip(prompts, images, strict=True)]
    result = evaluation.Evaluation(prompts, images, [v.ok for v in details], [v.failure for v in details])
    assert result.counts() == {task: (1, 2) for task in shapes.TASKS}
    assert result.accuracy() == {"overall": 0.5, **{task: 0.5 for task in shapes.TASKS}}
    table = result.table()
    assert "| counting | 1/2 | 0.500 |" in table and "| overall (mean of tasks) | 6/12 | 0.500 |" in table
    # The blank images hold no object and no clutter: counting finds the wrong number (0), every other task
    # misses a named object.
    assert result.failure_counts() == {
        task: {"clutter": 0, "missing": int(task != "counting"), "count": int(task == "counting"), "relation": 0}
        for task in shapes.TASKS}
    failures = result.failure_table()
    assert "| counting | 1/2 | 0 | 0 | 1 | 0 |" in failures and "| all | 6/12 | 0 | 5 | 1 | 0 |" in failures
    with pytest.raises(ValueError, match="no failures recorded"):
        evaluation.Evaluation(prompts, images, [v.ok for v in details]).failure_counts()


def test_overall_interval_is_the_pooled_one_for_equal_task_counts_and_covers_unequal_ones():
    from sana_jax.data.pipeline import DataConfig

    rng = np.random.default_rng(0)
    equal = evaluation.eval_prompts(DataConfig(), 60, seed=5)
    verdicts = list(rng.random(60) < 0.4)
    result = evaluation.Evaluation(equal, np.zeros((60, 1, 1, 3)), verdicts)
    np.testing.assert_allclose(result.overall_interval(), evaluation.wilson_interval(sum(verdicts), 60))

    # Two tasks have 30 prompts, four have 60 (the hard tasks twice in the mix); the true task accuracies
    # differ. Over repeated draws the interval must cover the true mean about 95 % of the time.
    tasks = ("single_object", "two_objects", "counting", "colors", "position", "color_attr",
             "two_objects", "counting", "position", "color_attr")
    prompts = evaluation.eval_prompts(DataConfig(tasks=tasks), 300, seed=5)
    truth = dict(zip(shapes.TASKS, (0.8, 0.3, 0.45, 0.6, 0.1, 0.15), strict=True))
    p = np.array([truth[shapes.parse_prompt(q).task] for q in prompts])
    covered = []
    for _ in range(1000):
        draw = evaluation.Evaluation(prompts, np.zeros((300, 1, 1, 3)), list(rng.random(300) < p))
        low, high = draw.overall_interval()
        assert low <= draw.accuracy()["overall"] <= high
        covered.append(low <= np.mean(list(truth.values())) <= high)
    assert 0.93 <= np.mean(covered) <= 0.98


def test_eval_prompts_cycle_through_the_tasks():
    from sana_jax.data.pipeline import DataConfig

    prompts = evaluation.eval_prompts(DataConfig(), 12, seed=5)
    assert [shapes.parse_prompt(p).task for p in prompts] == list(shapes.TASKS) * 2


def test_trainer_logs_per_task_accuracy_and_records_how_to_sample(tmp_path):
    from sana_jax.trainer import train

    config = tiny_config(steps=2, **{"sampling.num_prompts": 6, "sampling.num_steps": 2,
                                     "sampling.guidance_scale": 2.5, "sampling.shift": 4.0})
    train(config, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "sample_accuracy" in r]
    assert [r["step"] for r in rows] == [2]
    per_task = [rows[0][f"sample_accuracy/{t}"] for t in shapes.TASKS]
    assert rows[0]["sample_accuracy"] == pytest.approx(np.mean(per_task))

    metadata = checkpoint.load_metadata(tmp_path / "model")
    assert metadata["sampling"] == {"num_steps": 2, "guidance_scale": 2.5, "shift": 4.0,
                                    "solver": "flow_dpm_solver"}
    assert metadata["data"]["resolution"] == 32 and metadata["data"]["text_dim"] == 64
    json.dumps(metadata)  # plain JSON

    # The sampling CLI follows the metadata unless told otherwise; without metadata, SANA's defaults.
    args = parse_args(["--checkpoint", str(tmp_path / "model"), "--prompt", "a circle", "--out", "x"])
    assert (args.num_steps, args.guidance_scale, args.shift) == (2, 2.5, 4.0)
    args = parse_args(["--checkpoint", str(tmp_path / "model"), "--prompt", "a circle", "--out", "x",
                       "--shift", "3"])
    assert args.shift == 3.0
    (tmp_path / "model" / checkpoint.METADATA_FILE).unlink()
    args = parse_args(["--checkpoint", str(tmp_path / "model"), "--prompt", "a circle", "--out", "x"])
    assert {k: getattr(args, k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS

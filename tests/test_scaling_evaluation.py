"""sana_jax.scaling.evaluation and verifier_data: accuracy-vs-N curves, AUC and verifier data against NumPy."""

import itertools

import numpy as np
import pytest

from sana_jax.data import shapes
from sana_jax.scaling import evaluation, search, verifier_data


def _brute_force(scores, accepted, n):
    """Per-prompt (learned, oracle, random) accuracies with explicit loops over prompts and groups."""
    learned, oracle, random = [], [], []
    for s, a in zip(scores, accepted, strict=True):
        picks, anys, means = [], [], []
        for g in range(len(s) // n):
            group = range(g * n, (g + 1) * n)
            best = max(group, key=lambda i: (s[i], -i))  # The highest score; the lowest index on ties.
            picks.append(a[best])
            anys.append(max(a[i] for i in group))
            means.append(sum(a[i] for i in group) / n)
        learned.append(np.mean(picks))
        oracle.append(np.mean(anys))
        random.append(np.mean(means))
    return np.array(learned), np.array(oracle), np.array(random)


@pytest.mark.parametrize("num_candidates", [8, 12])
def test_curves_match_brute_force(num_candidates):
    rng = np.random.default_rng(num_candidates)
    scores = rng.integers(0, 4, (5, num_candidates)).astype(np.float64)  # Few values: many ties.
    accepted = (rng.random((5, num_candidates)) < 0.3).astype(int)
    for n in range(1, num_candidates + 1):
        learned, oracle, random = _brute_force(scores, accepted, n)
        np.testing.assert_allclose(evaluation.selection_accuracy({"scores": scores}, accepted, n), learned)
        np.testing.assert_allclose(evaluation.oracle_accuracy(accepted, n), oracle)
        np.testing.assert_allclose(evaluation.random_accuracy(accepted, n), random)


def test_knockout_selection_accuracy_matches_per_group_tournaments():
    rng = np.random.default_rng(2)
    yes, no = rng.integers(0, 3, (2, 4, 16)).astype(np.float64)  # Few values: many ties.
    accepted = (rng.random((4, 16)) < 0.4).astype(int)
    tables = {"yes_logits": yes, "no_logits": no}
    for n in (1, 2, 4, 8, 16):
        want = [np.mean([a[g * n + search.knockout(y[None, g * n:(g + 1) * n], o[None, g * n:(g + 1) * n])[0, 0]]
                         for g in range(16 // n)]) for y, o, a in zip(yes, no, accepted, strict=True)]
        np.testing.assert_allclose(evaluation.selection_accuracy(tables, accepted, n, "knockout"), want)


def test_curves_bounds_and_end_points():
    rng = np.random.default_rng(0)
    scores, accepted = rng.standard_normal((7, 16)), (rng.random((7, 16)) < 0.2).astype(int)
    counts = evaluation.candidate_counts(16)
    assert counts == [1, 2, 4, 8, 16]
    curves = evaluation.scaling_curves(scores, accepted, counts)
    assert {k: v.shape for k, v in curves.items()} == {m: (5, 7) for m in evaluation.CURVES}
    np.testing.assert_allclose(curves["learned"][0], accepted.mean(axis=1))  # N = 1: no choice.
    np.testing.assert_allclose(curves["oracle"][-1], accepted.max(axis=1))
    np.testing.assert_allclose(curves["random"], np.broadcast_to(accepted.mean(axis=1), (5, 7)))
    assert np.all(curves["learned"] <= curves["oracle"] + 1e-12)
    assert np.all(np.diff(curves["oracle"], axis=0) >= -1e-12)
    # A verifier that knows the verdicts reaches the oracle.
    np.testing.assert_allclose(evaluation.scaling_curves(accepted + 0.0, accepted, counts)["learned"], curves["oracle"])


def test_candidate_counts_need_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        evaluation.candidate_counts(12)


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 40).astype(np.float64)
    labels = rng.random(40) < 0.4
    wins = [1.0 if p > q else 0.5 if p == q else 0.0
            for p, q in itertools.product(scores[labels], scores[~labels])]
    assert evaluation.auc(scores, labels) == pytest.approx(np.mean(wins))
    assert np.isnan(evaluation.auc(scores, np.ones(40)))
    within, informative = evaluation.mean_within_prompt_auc(np.stack([scores, scores]), np.stack([labels, np.ones(40)]))
    assert informative == 1 and within == pytest.approx(np.mean(wins))


def test_summarize_mean_and_standard_error():
    values = np.array([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    summary = evaluation.summarize(values)
    np.testing.assert_allclose(summary["mean"], [0.5, 1.0])
    np.testing.assert_allclose(summary["se"], [np.std([0, 1, 1, 0], ddof=1) / 2, 0.0])


def test_perturbed_prompts_stay_in_the_grammar_and_change():
    rng = np.random.default_rng(0)
    for index in range(60):
        prompt = shapes.make_sample(3, index).prompt
        for _ in range(5):
            other = verifier_data.perturb_prompt(prompt, rng)
            assert other != prompt
            assert shapes.parse_prompt(other).task == shapes.parse_prompt(prompt).task


def test_degrade_keeps_range_and_is_mild_at_zero_strength():
    sample = shapes.make_sample(0, 4)
    rng = np.random.default_rng(0)
    for strength in (0.0, 0.5, 1.0):
        image = verifier_data.degrade(sample.image, rng, strength)
        assert image.shape == sample.image.shape and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.abs(verifier_data.degrade(sample.image, rng, 0.0) - sample.image / 255.0).mean() < 0.06


def test_matched_compute_pairs_equal_depth_times_n():
    def report(depth, learned):
        curves = {m: {"mean": list(learned), "se": [0.0] * 4} for m in evaluation.CURVES}
        return {"depth": depth, "curves": curves}

    reports = {"small": report(4, [0.1, 0.2, 0.3, 0.4]), "large": report(8, [0.5, 0.6, 0.7, 0.8])}
    rows = evaluation.matched_compute(reports, [1, 2, 4, 8])
    assert [r["depth_x_n"] for r in rows] == [8, 16, 32]
    assert rows[0]["models"]["small"]["n"] == 2 and rows[0]["models"]["large"]["n"] == 1
    assert rows[2]["models"]["small"]["learned"] == 0.4 and rows[2]["models"]["large"]["learned"] == 0.7


def test_score_report_per_task_means():
    rng = np.random.default_rng(3)
    scores, accepted = rng.standard_normal((6, 4)), (rng.random((6, 4)) < 0.5).astype(int)
    tasks = ["a", "b", "a", "c", "b", "a"]
    report = evaluation.score_report(scores, accepted, [1, 2, 4], tasks)
    assert list(report["per_task"]) == ["a", "b", "c"]
    assert report["per_task"]["a"]["prompts"] == 3
    np.testing.assert_allclose(report["per_task"]["a"]["oracle"],
                               [accepted[[0, 2, 5]].mean(), np.mean([accepted[[0, 2, 5], :2].max(1).mean(),
                                accepted[[0, 2, 5], 2:].max(1).mean()]), accepted[[0, 2, 5]].max(1).mean()])
    assert report["acceptance"] == pytest.approx(accepted.mean())
    assert report["verifier_auc"] == pytest.approx(evaluation.auc(scores, accepted))

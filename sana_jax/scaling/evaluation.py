"""Accuracy of inference-time search against the number of candidates N, from score tables.

Tables are (P, N_max) for P prompts with N_max candidates each: verifier outputs (see
`search.verifier_tables`) and checker verdicts `accepted` (0/1). For N = 1, 2, 4, ..., N_max the selected
sample's accuracy is averaged over the N_max // N disjoint groups of N consecutive candidates, so small N
is not a single draw:
  learned   the verifier's pick (`search.select_from_tables`);
  oracle    the checker's own pick: 1 if any of the N is accepted;
  random    any one of the N: the mean acceptance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sana_jax.scaling import search

CURVES = ("random", "learned", "oracle")


def candidate_counts(max_candidates: int) -> list[int]:
    """N = 1, 2, 4, ..., max_candidates (a power of two)."""
    if max_candidates < 1 or max_candidates & (max_candidates - 1):
        raise ValueError(f"max_candidates={max_candidates}: expected a power of two")
    return [2**i for i in range(int(math.log2(max_candidates)) + 1)]


def _groups(table: np.ndarray, n: int) -> np.ndarray:
    """(P, N_max) -> (P, N_max // n, n): disjoint groups of n consecutive candidates."""
    table = np.asarray(table)
    num_prompts, num_candidates = table.shape
    if not 1 <= n <= num_candidates:
        raise ValueError(f"n={n}: expected 1 <= n <= {num_candidates} (the candidates per prompt)")
    groups = num_candidates // n
    return table[:, :groups * n].reshape(num_prompts, groups, n)


def selection_accuracy(tables: Mapping[str, np.ndarray], accepted: np.ndarray, n: int,
                       method: str = "best_of_n") -> np.ndarray:
    """Per-prompt checker accuracy (P,) of the verifier's pick of n candidates, averaged over the groups.

    Args:
      tables: (P, N_max) verifier tables for `method` (`search.verifier_tables`), e.g. {"scores": ...} with
        higher better (ties go to the lower index).
      accepted: (P, N_max) checker verdicts, 0/1.
      n: candidates per group; groups are candidates [g n, (g + 1) n) for g < N_max // n.
      method: the selection rule, one of `search.METHODS`.
    """
    accepted_groups = _groups(np.asarray(accepted, np.float64), n)
    num_prompts, num_groups, _ = accepted_groups.shape
    flat = {name: _groups(t, n).reshape(num_prompts * num_groups, n) for name, t in tables.items()}
    picks = search.select_from_tables(flat, 1, method)
    picked = np.take_along_axis(accepted_groups.reshape(num_prompts * num_groups, n), picks, axis=1)
    return picked.reshape(num_prompts, num_groups).mean(axis=1)


def oracle_accuracy(accepted: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt accuracy (P,) of the checker's own pick: whether any of n candidates is accepted."""
    return _groups(np.asarray(accepted, np.float64), n).max(axis=2).mean(axis=1)


def random_accuracy(accepted: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt accuracy (P,) of a random one of n candidates: the groups' mean acceptance."""
    return _groups(np.asarray(accepted, np.float64), n).mean(axis=(1, 2))


def scaling_curves(scores: np.ndarray, accepted: np.ndarray, counts: Sequence[int]) -> dict[str, np.ndarray]:
    """{curve: (len(counts), P) per-prompt accuracy} for CURVES at each N in counts; learned is best-of-N."""
    return {
        "random": np.stack([random_accuracy(accepted, n) for n in counts]),
        "learned": np.stack([selection_accuracy({"scores": scores}, accepted, n) for n in counts]),
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


def score_report(scores: np.ndarray, accepted: np.ndarray, counts: Sequence[int],
                 tasks: Sequence[str]) -> dict[str, Any]:
    """Curves (overall and per task) and verifier agreement of one model's (P, N_max) tables.

    Args:
      scores: (P, N_max) verifier scores; accepted: (P, N_max) checker verdicts, 0/1.
      counts: the N of the curves (`candidate_counts`).
      tasks: the P prompts' tasks; per-task curves hold the mean over the task's prompts, in first-seen order.
    """
    curves = scaling_curves(scores, accepted, counts)
    per_task = {}
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        per_task[task] = {"prompts": len(rows)} | {m: summarize(c[:, rows])["mean"] for m, c in curves.items()}
    within, informative = mean_within_prompt_auc(scores, accepted)
    return {
        "acceptance": float(np.mean(accepted)), "curves": {m: summarize(c) for m, c in curves.items()},
        "per_task": per_task, "verifier_auc": auc(scores, accepted), "verifier_within_prompt_auc": within,
        "prompts_with_both_verdicts": informative,
    }


def matched_compute(reports: Mapping[str, Mapping[str, Any]], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Rows of equal depth x N (sampling compute in block-passes): each model's N and accuracies there.

    Args:
      reports: {model name: {"depth": blocks, "curves": {curve: {"mean": (len(counts),)}}}}.
      counts: the N of the curves.

    Returns:
      [{"depth_x_n": budget, "models": {name: {"n": N} | {curve: mean accuracy}}}] for the budgets that at
      least two models reach with an N in counts, smallest first.
    """
    budgets = sorted({r["depth"] * n for r in reports.values() for n in counts})
    rows = []
    for budget in budgets:
        row = {"depth_x_n": budget, "models": {}}
        for name, report in reports.items():
            n = budget // report["depth"]
            if budget % report["depth"] == 0 and n in counts:
                k = list(counts).index(n)
                row["models"][name] = {"n": n} | {m: report["curves"][m]["mean"][k] for m in CURVES}
        if len(row["models"]) > 1:
            rows.append(row)
    return rows

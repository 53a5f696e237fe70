"""Choosing the best of N candidate images per prompt from verifier outputs.

Everything here is batched over prompts: arrays are (P, N) for P prompts with N candidates each,
and selections are (P, k) candidate indices into the N axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_table(name: str, table: np.ndarray) -> np.ndarray:
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"{name} has shape {table.shape}: expected (prompts, candidates)")
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{name} holds non-finite values: expected finite scores or logits")
    return table


def _check_k(k: int, num_candidates: int) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_candidates:
        raise ValueError(f"k={k!r}: expected an integer in [1, {num_candidates}] (the number of candidates)")


def best_of_n(scores: np.ndarray, k: int = 1) -> np.ndarray:
    """The k highest-scoring candidates per prompt.

    Args:
      scores: (P, N) verifier scores, higher is better.
      k: how many candidates to keep per prompt.

    Returns:
      (P, k) int candidate indices, best first; equal scores keep the lower index first.
    """
    scores = _check_table("scores", scores)
    _check_k(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def judge_winner(yes_a: np.ndarray, no_a: np.ndarray, yes_b: np.ndarray, no_b: np.ndarray) -> np.ndarray:
    """Whether candidate a beats candidate b under SANA's yes/no judge rules (elementwise).

    A candidate answers "yes" when its yes-logit exceeds its no-logit. A yes beats a no; between two
    yeses the higher yes-logit wins; between two noes the lower no-logit wins. On an exact tie b wins,
    as in SANA's comparison script (its comparisons are strict).

    Returns:
      bool array, True where a wins.
    """
    a_yes = yes_a > no_a
    b_yes = yes_b > no_b
    same_answer_winner = np.where(a_yes, yes_a > yes_b, no_a < no_b)
    return np.where(a_yes != b_yes, a_yes, same_answer_winner)


def knockout(yes_logits: np.ndarray, no_logits: np.ndarray, k: int = 1) -> np.ndarray:
    """SANA's knockout tournament over adjacent pairs until k candidates remain per prompt.

    Each round pairs the surviving candidates in order, (0, 1), (2, 3), ..., and keeps each pair's
    `judge_winner`. When N / k is a power of two every round halves the field, exactly as SANA does.
    Otherwise a round with m > k survivors plays only min(m // 2, m - k) matches, so the field never
    drops below k; the candidates left over at the end of the order get a bye into the next round.

    Args:
      yes_logits: (P, N) logit of the judge's "yes" token per candidate.
      no_logits: (P, N) logit of the judge's "no" token per candidate.
      k: how many candidates to keep per prompt.

    Returns:
      (P, k) int candidate indices of the survivors in bracket order (winners of the last round's
      matches first, then byes), not ranked.
    """
    yes_logits = _check_table("yes_logits", yes_logits)
    no_logits = _check_table("no_logits", no_logits)
    if yes_logits.shape != no_logits.shape:
        raise ValueError(f"yes_logits {yes_logits.shape} and no_logits {no_logits.shape} differ in shape")
    num_prompts, num_candidates = yes_logits.shape
    _check_k(k, num_candidates)

    survivors = np.tile(np.arange(num_candidates), (num_prompts, 1))
    while survivors.shape[1] > k:
        field = survivors.shape[1]
        matches = min(field // 2, field - k)
        a = survivors[:, 0:2 * matches:2]
        b = survivors[:, 1:2 * matches:2]
        at = lambda table, index: np.take_along_axis(table, index, axis=1)
        a_wins = judge_winner(at(yes_logits, a), at(no_logits, a), at(yes_logits, b), at(no_logits, b))
        survivors = np.concatenate([np.where(a_wins, a, b), survivors[:, 2 * matches:]], axis=1)
    return survivors


METHODS = ("best_of_n", "knockout")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")


def verifier_tables(verifier: Any, images: np.ndarray, prompts: Sequence[str],
                    method: str = "best_of_n") -> dict[str, np.ndarray]:
    """The verifier's judgement of N candidate images for each of P prompts, as (P, N) tables.

    Every image is judged once, in prompt-major order: a judge's logits for an image do not depend on its
    opponent, so the tournament can run on the table of all N candidates (SANA's script asks the judge
    again each round).

    Args:
      verifier: has `score(images, prompts)` for "best_of_n", `yes_no_logits(images, prompts)` for
        "knockout" (see `verifiers.VLMJudge`).
      images: (P, N, H, W, 3) candidates in [0, 1].
      prompts: the P prompts.
      method: the selection rule the tables are for.

    Returns:
      {"scores": (P, N)} for "best_of_n"; {"yes_logits": (P, N), "no_logits": (P, N)} for "knockout".
    """
    _check_method(method)
    images = np.asarray(images)
    if images.ndim != 5 or isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"images {images.shape} and {len(prompts)} prompts: expected images "
                         f"(P, N, H, W, 3) for P = len(prompts)")
    num_prompts, num_candidates = images.shape[:2]
    flat_images = images.reshape(-1, *images.shape[2:])
    flat_prompts = [p for p in prompts for _ in range(num_candidates)]
    table = lambda values: np.asarray(values).reshape(num_prompts, num_candidates)
    if method == "best_of_n":
        return {"scores": table(verifier.score(flat_images, flat_prompts))}
    yes, no = verifier.yes_no_logits(flat_images, flat_prompts)
    return {"yes_logits": table(yes), "no_logits": table(no)}


def select_from_tables(tables: dict[str, np.ndarray], k: int, method: str = "best_of_n") -> np.ndarray:
    """Keeps k of N candidates per prompt from `verifier_tables`' output (any (P, N) tables of those keys).

    Returns:
      (P, k) int indices into the N candidates: best first for "best_of_n", bracket order for "knockout".
    """
    _check_method(method)
    if method == "best_of_n":
        return best_of_n(tables["scores"], k)
    return knockout(tables["yes_logits"], tables["no_logits"], k)


def select(verifier: Any, images: np.ndarray, prompts: Sequence[str], k: int,
           method: str = "best_of_n") -> np.ndarray:
    """Judges N candidate images for each of P prompts and keeps k per prompt.

    Args:
      verifier, images, prompts, method: as for `verifier_tables`.
      k: candidates to keep per prompt.

    Returns:
      (P, k) int indices into the N candidates (see `select_from_tables`).
    """
    return select_from_tables(verifier_tables(verifier, images, prompts, method), k, method)

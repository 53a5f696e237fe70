"""Best-of-N and the knockout tournament on hand-worked score tables."""

import numpy as np
import pytest

from sana_jax.scaling import search


def test_best_of_n_orders_by_score_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.9],
                       [3.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(search.best_of_n(scores, 1), [[1], [0]])
    np.testing.assert_array_equal(search.best_of_n(scores, 2), [[1, 3], [0, 1]])
    np.testing.assert_array_equal(search.best_of_n(scores, 3), [[1, 3, 2], [0, 1, 2]])


# Per candidate (yes-logit, no-logit). Worked by hand:
#   row 0: (0 vs 1) yes beats no -> 0; (2 vs 3) two yeses, 5 > 3 -> 3; final (0 vs 3) 5 > 2 -> 3.
#   row 1: (0 vs 1) two noes, 2 < 3 -> 1; (2 vs 3) both yes == no, so both answer no with equal
#          no-logits: exact tie, the second wins -> 3; final (1 vs 3) two noes, 1 < 2 -> 3.
#   row 2: (0 vs 1) two yeses with equal yes-logits: exact tie -> 1; (2 vs 3) no loses to yes -> 3;
#          final (1 vs 3) two yeses, 4 > 2 -> 1.
_TABLE = np.array([
    [(2, 1), (0, 1), (3, 0), (5, 4)],
    [(0, 3), (0, 2), (1, 1), (1, 1)],
    [(4, 1), (4, 0), (0, 9), (2, -1)],
], dtype=np.float64)
_YES, _NO = _TABLE[..., 0], _TABLE[..., 1]


def test_knockout_power_of_two():
    np.testing.assert_array_equal(search.knockout(_YES, _NO, 1), [[3], [3], [1]])
    np.testing.assert_array_equal(search.knockout(_YES, _NO, 2), [[0, 3], [1, 3], [1, 3]])
    np.testing.assert_array_equal(search.knockout(_YES, _NO, 4), [[0, 1, 2, 3]] * 3)


def test_knockout_eight_to_two():
    # Two rounds. Round 1: (0,1) -> 0 (yes beats no); (2,3) -> 2 (no-logit 1 < 5); (4,5) -> 5 (7 > 6);
    # (6,7) -> 7 (tie goes to the second). Round 2: (0,2) -> 0 (yes beats no); (5,7) -> 5 (7 > 3).
    yes = np.array([[1, 0, 0, 0, 6, 7, 3, 3]], dtype=float)
    no = np.array([[0, 1, 1, 5, 0, 0, 2, 2]], dtype=float)
    np.testing.assert_array_equal(search.knockout(yes, no, 2), [[0, 5]])


def test_knockout_with_byes():
    # Candidates answer yes with these yes-logits (no-logit 0), so the higher value wins each match.
    yes = np.array([[5.0, 1.0, 2.0, 8.0, 3.0, 4.0]])
    no = np.zeros_like(yes)
    # N=6, k=4: 6 -> 4 in one round of two matches: (0,1) -> 0, (2,3) -> 3; 4 and 5 get byes.
    np.testing.assert_array_equal(search.knockout(yes, no, 4), [[0, 3, 4, 5]])
    # N=6, k=1: round 1 plays three matches -> [0, 3, 5]; round 2 plays (0,3) -> 3, 5 gets a bye;
    # round 3 plays (3,5) -> 3.
    np.testing.assert_array_equal(search.knockout(yes, no, 1), [[3]])
    # N=5, k=2: round 1 -> [0, 3] and a bye for 4; round 2 plays (0,3) -> 3 and 4 keeps its bye.
    np.testing.assert_array_equal(search.knockout(yes[:, :5], no[:, :5], 2), [[3, 4]])
    # N=3, k=2: one match (0,1) -> 0, then 2 with a bye.
    np.testing.assert_array_equal(search.knockout(yes[:, :3], no[:, :3], 2), [[0, 2]])


def _sana_bracket(yes: np.ndarray, no: np.ndarray, k: int) -> list[int]:
    """SANA's pairwise loop, written out over Python lists (N / k a power of two)."""
    files = list(range(len(yes)))
    while len(files) > k:
        kept = []
        for i in range(0, len(files), 2):
            a, b = files[i], files[i + 1]
            answer_a, answer_b = yes[a] > no[a], yes[b] > no[b]
            if answer_a == answer_b:
                if answer_a:
                    kept.append(a if yes[a] > yes[b] else b)
                else:
                    kept.append(a if no[a] < no[b] else b)
            else:
                kept.append(a if answer_a else b)
        files = kept
    return files


def test_knockout_matches_scalar_loop_on_random_tables():
    rng = np.random.default_rng(0)
    # Rounded logits make ties and equal answers frequent.
    yes = np.round(rng.normal(size=(5, 32)), 1)
    no = np.round(rng.normal(size=(5, 32)), 1)
    for k in (1, 4, 8):
        expected = [_sana_bracket(y, n, k) for y, n in zip(yes, no, strict=True)]
        np.testing.assert_array_equal(search.knockout(yes, no, k), expected)


@pytest.mark.parametrize("k", [0, 5, 1.5])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match="k="):
        search.best_of_n(np.zeros((2, 4)), k)
    with pytest.raises(ValueError, match="k="):
        search.knockout(np.zeros((2, 4)), np.zeros((2, 4)), k)


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        search.best_of_n(np.zeros(4), 1)
    with pytest.raises(ValueError, match="non-finite"):
        search.best_of_n(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="differ in shape"):
        search.knockout(np.zeros((2, 4)), np.zeros((2, 3)), 1)


class _TableJudge:
    """Judges an image by the id painted into it: image value id / 100 -> logits from fixed tables."""

    def __init__(self, yes: np.ndarray, no: np.ndarray):
        self.yes, self.no, self.calls = yes.ravel(), no.ravel(), []

    def _ids(self, images, prompts):
        self.calls.append(list(prompts))
        return np.round(images[:, 0, 0, 0] * 100).astype(int)

    def yes_no_logits(self, images, prompts):
        ids = self._ids(images, prompts)
        return self.yes[ids], self.no[ids]

    def score(self, images, prompts):
        ids = self._ids(images, prompts)
        return self.yes[ids] - self.no[ids]


def test_select_judges_each_candidate_once_in_prompt_major_order():
    num_prompts, num_candidates = _YES.shape
    ids = np.arange(num_prompts * num_candidates).reshape(num_prompts, num_candidates)
    images = np.broadcast_to(ids[:, :, None, None, None] / 100.0, (*ids.shape, 2, 2, 3))
    judge = _TableJudge(_YES, _NO)
    prompts = ["p0", "p1", "p2"]

    winners = search.select(judge, images, prompts, 1, method="knockout")
    np.testing.assert_array_equal(winners, [[3], [3], [1]])
    assert judge.calls == [["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4]
    # Best-of-N on the yes-minus-no margins: row 0 [1, -1, 3, 1], row 1 [-3, -2, 0, 0], row 2 [3, 4, -9, 3].
    np.testing.assert_array_equal(search.select(judge, images, prompts, 2), [[2, 0], [2, 3], [1, 0]])
    with pytest.raises(ValueError, match="method='vote'"):
        search.select(judge, images, prompts, 1, method="vote")
    with pytest.raises(ValueError, match="P = len"):
        search.select(judge, images, prompts[:2], 1)

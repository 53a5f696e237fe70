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


# Pairwise decisions worked by hand from the documented rule (SANA's judge script, docs/inference_scaling.md): a
# candidate answers yes when its yes-logit exceeds its no-logit (equal logits answer no); a yes beats a no;
# two yeses: the higher yes-logit wins; two noes: the lower no-logit wins; an exact tie goes to b.
# ((yes_a, no_a), (yes_b, no_b), winner)
JUDGE_CASES = [
    ((2, 1), (0, 1), "a"),  # yes beats no
    ((0, 1), (3, 0), "b"),
    ((0.5, 0), (9, 9.5), "a"),  # b has the larger yes-logit but answers no
    ((5, 4), (3, 0), "a"),  # two yeses: 5 > 3, although b's margin is larger
    ((3, 0), (5, 4), "b"),
    ((-5, 2), (1, 3), "a"),  # two noes: 2 < 3, although b's yes-logit and margin are larger
    ((1, 3), (-5, 2), "b"),
    ((1, 1), (0, 0.5), "b"),  # equal logits answer no; two noes: 0.5 < 1
    ((2, 2), (0, 3), "a"),  # two noes: 2 < 3
    ((1, 1), (0, -1), "b"),  # b answers yes (0 > -1)
    ((4, 1), (4, 0), "b"),  # two yeses with equal yes-logits: tie
    ((0, 2), (1, 2), "b"),  # two noes with equal no-logits: tie
    ((1, 0), (1, 0), "b"),
]


def test_judge_winner_follows_the_table():
    a = np.array([case[0] for case in JUDGE_CASES], float)
    b = np.array([case[1] for case in JUDGE_CASES], float)
    expected = [case[2] == "a" for case in JUDGE_CASES]
    np.testing.assert_array_equal(search.judge_winner(a[:, 0], a[:, 1], b[:, 0], b[:, 1]), expected)


# Brackets worked by hand. A round with m > k survivors plays min(m // 2, m - k) matches over adjacent pairs
# in order; winners come first, the unmatched tail gets byes.
_SEVEN = [(2, 5), (0, 3), (1, 0), (6, 7), (4, 4), (3, 1), (9, 10)]  # answers: no no yes no no yes no
# Round 1 for every k < 4 plays (0,1) -> 1 (noes, 3 < 5), (2,3) -> 2 (yes), (4,5) -> 5 (yes); 6 has a bye.
BRACKETS = [
    # Seven to one: [1, 2, 5, 6]; round 2 (1,2) -> 2 (yes), (5,6) -> 5 (yes); round 3 (2,5) -> 5 (3 > 1).
    (_SEVEN, 1, [5]),
    (_SEVEN, 2, [2, 5]),  # [1, 2, 5, 6], then both matches of round 2
    # [1, 2, 5, 6], then one match (4 - 3): (1,2) -> 2; 5 and 6 get byes. 6 (yes-logit 9, answers no) survives.
    (_SEVEN, 3, [2, 5, 6]),
    (_SEVEN, 4, [1, 2, 5, 6]),  # three matches (7 - 4), then done
    (_SEVEN, 5, [1, 2, 4, 5, 6]),  # two matches: (0,1) -> 1, (2,3) -> 2; byes 4, 5, 6
    (_SEVEN, 6, [1, 2, 3, 4, 5, 6]),  # one match: (0,1) -> 1
    (_SEVEN, 7, [0, 1, 2, 3, 4, 5, 6]),  # no match
    # All yes, yes-logits [3, 9, 4, 1, 7, 2, 8, 5]. Eight to three: round 1 four matches -> [1, 2, 4, 6];
    # round 2 one match (4 - 3): (1,2) -> 1 (9 > 4), byes 4 and 6.
    ([(3, 0), (9, 0), (4, 0), (1, 0), (7, 0), (2, 0), (8, 0), (5, 0)], 3, [1, 4, 6]),
    # Eight identical candidates: every match is a tie and the second wins: [1, 3, 5, 7] -> [3, 7] -> [7].
    ([(1, 0)] * 8, 1, [7]),
    ([(1, 0)] * 8, 2, [3, 7]),
]


@pytest.mark.parametrize("candidates, k, expected", BRACKETS)
def test_knockout_follows_hand_worked_brackets(candidates, k, expected):
    table = np.array(candidates, float)[None]
    np.testing.assert_array_equal(search.knockout(table[..., 0], table[..., 1], k), [expected])


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

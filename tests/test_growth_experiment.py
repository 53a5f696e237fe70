"""tools/experiments/growth_experiment.py --quick end to end: the arms it trains at matched compute, the identity
of partial preservation on the trained base, the scores it writes, and that a rerun resumes from what the first
run saved.

The library functions it runs are tested in tests/test_surgery.py (growth), tests/test_train.py (the trainer's
growth runs) and tests/test_evaluation.py (GenEval-lite).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
ARMS = ("base", "partial_preservation", "cyclic", "block_expand", "continued", "scratch")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "experiments" / "growth_experiment.py"), "--quick",
         f"--workdir={tmp_path / 'work'}", f"--out_json={tmp_path / 'growth.json'}",
         f"--out_png={tmp_path / 'growth.png'}", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_quick_run_trains_matched_arms_scores_and_resumes(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "growth.json").read_text())
    assert results["depths"] == {"base": 2, "target": 4}
    assert list(results["final"]) == list(ARMS)
    curves = results["curves"]
    # 4 base steps x 2 blocks + 2 grown steps x 4 blocks = 16 block-steps = 4 scratch steps x 4 blocks; the
    # continued base makes the grown stage's 2 steps at its own 2 blocks.
    assert results["steps"] == {"base": 4, "partial_preservation": 2, "cyclic": 2, "block_expand": 2,
                                "continued": 2, "scratch": 4}
    assert curves["base"]["compute"] == [0, 4, 8] and curves["scratch"]["compute"] == [0, 8, 16]
    for arm in ("partial_preservation", "cyclic", "block_expand"):
        assert curves[arm]["compute"] == [8, 16]
    assert curves["continued"]["compute"] == [8, 12]
    # Partial preservation adds exact identities, and the continued base is the base itself: both start at the
    # trained base's held-out loss.
    for arm in ("partial_preservation", "continued"):
        assert curves[arm]["eval_loss"][0] == pytest.approx(curves["base"]["eval_loss"][-1], rel=1e-5)
    assert json.loads((tmp_path / "work" / "seed0" / "continued" / "surgery.json").read_text())["to_depth"] == 2
    assert "partial_preservation - continued" in results["paired"]
    for arm in ARMS:
        scores = json.loads((tmp_path / "work" / "seed0" / arm / "scores.json").read_text())
        assert set(scores["counts"]) == set(TASKS)
        assert sum(n for _, n in scores["counts"].values()) == 12  # 12 prompts x 1 sample
        assert results["final"][arm]["overall"]["values"] == [scores["accuracy"]["overall"]]
    assert (tmp_path / "work" / "seed0" / "cyclic" / "base").resolve() == (tmp_path / "work" / "seed0" / "base")
    assert (tmp_path / "growth.png").stat().st_size > 0
    saved = sorted((tmp_path / "work").rglob("scores.json")) + sorted((tmp_path / "work").rglob("model/*.json"))
    stamps = [p.stat().st_mtime_ns for p in saved]

    (tmp_path / "growth.json").unlink()
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "growth.json").read_text()) == results
    assert [p.stat().st_mtime_ns for p in saved] == stamps  # nothing was trained or scored again


def test_bad_strategy_is_one_line(tmp_path):
    result = _run(tmp_path, "--strategies=partial_preservation,widen")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --strategies=partial_preservation,widen: 'widen' is not one of partial_preservation, cyclic, "
        "block_expand"]

"""tools/experiments/pruning_experiment.py --quick end to end on a random 2-block model: the cuts it makes, the
scores it writes, and that a rerun resumes from what the first run saved.

The library functions it runs are tested in tests/test_surgery.py (importance, pruning) and
tests/test_evaluation.py (GenEval-lite).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def _run(model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "experiments" / "pruning_experiment.py"), f"--model={model}", "--quick",
         f"--workdir={tmp_path / 'work'}", "--config.batch_size=8", f"--out_json={tmp_path / 'pruning.json'}",
         f"--out_png={tmp_path / 'pruning.png'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_quick_run_cuts_scores_and_resumes(tmp_path):
    model = save_tiny_model(tmp_path / "model")

    first = _run(model, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "pruning.json").read_text())
    assert results["depth"] == 2 and list(results["cuts"]) == ["cut 0.5"]
    size = results["cuts"]["cut 0.5"]
    assert size["keep"] == 1
    assert set(size["arms"]) == {"importance", "importance_on_samples", "first", "random0"}
    assert size["arms"]["first"]["kept"] == [0]
    importance = results["importance"]
    assert len(importance["on_latents"]) == len(importance["on_samples"]) == 2
    assert size["arms"]["importance"]["kept"] == [max(range(2), key=importance["on_latents"].__getitem__)]
    for arm in size["arms"].values():
        for when in ("before", "after"):
            counts = arm[when]["counts"]
            assert set(counts) == set(TASKS) and sum(n for _, n in counts.values()) == 12  # 12 prompts x 1
            assert 0 <= arm[when]["accuracy"]["overall"] <= 1
    assert (tmp_path / "pruning.png").stat().st_size > 0
    saved = sorted((tmp_path / "work").rglob("scores.json"))
    assert len(saved) == len({tuple(a["kept"]) for a in size["arms"].values()})
    stamps = [p.stat().st_mtime_ns for p in saved]

    (tmp_path / "pruning.json").unlink()
    second = _run(model, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "pruning.json").read_text()) == results
    assert [p.stat().st_mtime_ns for p in saved] == stamps  # nothing was fine-tuned or scored again


def test_bad_model_is_one_line(tmp_path):
    result = _run(tmp_path / "nowhere", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --model='{tmp_path / 'nowhere'}': expected a checkpoint directory holding sana_config.json"]

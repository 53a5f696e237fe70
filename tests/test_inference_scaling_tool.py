"""tools/experiments/inference_scaling.py as a command: a --quick run on a random 2-block model, its curves'
invariants, reusing and extending the score tables of an earlier run, and a bad --model named in one line.

The logic it runs is tested in tests/test_scaling_evaluation.py and tests/test_search.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "experiments" / "inference_scaling.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_cli_names_a_missing_checkpoint(tmp_path):
    result = _run(f"--model=tiny={tmp_path}", "--max_candidates=2", "--num_prompts=1",
                  f"--out_json={tmp_path / 'out.json'}")
    assert result.returncode != 0
    assert f"--model='tiny={tmp_path}': no sana_config.json in {tmp_path}" in result.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_quick_runs_and_reused_tables(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    common = [f"--model=tiny={model}", "--quick", f"--verifier={tmp_path / 'verifier'}", "--chunk_size=2"]

    def run(name: str, n: int, *extra: str) -> tuple[dict, str]:
        result = _run(*common, f"--max_candidates={n}", f"--out_json={tmp_path / name}.json",
                      f"--out_png={tmp_path / name}.png", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text()), result.stdout

    four, _ = run("four", 4)  # trains and saves the verifier; the later runs load it
    report = four["models"]["tiny"]
    accepted = np.array(report["tables"]["accepted"])
    assert four["counts"] == [1, 2, 4] and accepted.shape == (6, 4)  # --quick: 6 prompts
    curves = {m: np.array(c["mean"]) for m, c in report["curves"].items()}
    assert curves["learned"][0] == curves["oracle"][0] == curves["random"][0] == accepted.mean()
    for n, k in zip(four["counts"], range(3), strict=True):  # oracle: a group of n succeeds if any is accepted
        groups = accepted.reshape(6, 4 // n, n).any(axis=2)
        assert curves["oracle"][k] == pytest.approx(groups.mean())
    assert np.all(np.diff(curves["oracle"]) >= 0) and np.all(curves["oracle"] >= curves["learned"])
    assert four["throughput"]["tiny"][0]["candidates"] == 2

    two, _ = run("two", 2)
    extended, out = run("extended", 4, f"--reuse={tmp_path / 'two.json'}")
    assert "score tables of 2 candidates reused" in out and "12 images in" in out  # 6 prompts x the 2 missing
    tables, fresh = extended["models"]["tiny"]["tables"], four["models"]["tiny"]["tables"]
    assert [row[:2] for row in tables["verifier_scores"]] == two["models"]["tiny"]["tables"]["verifier_scores"]
    np.testing.assert_allclose(np.array(tables["verifier_scores"])[:, 2:],
                               np.array(fresh["verifier_scores"])[:, 2:], atol=2e-4)
    cut, out = run("cut", 2, f"--reuse={tmp_path / 'four.json'}")
    assert "images in" not in out  # nothing sampled: the first 2 of 4 candidates
    assert cut["models"]["tiny"]["tables"]["accepted"] == [row[:2] for row in fresh["accepted"]]

"""tools/experiments/inference_scaling.py as a command: it imports, parses its flags and names a bad --model.

The logic it runs is tested in tests/test_scaling_evaluation.py and tests/test_search.py.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "experiments" / "inference_scaling.py"), f"--model=tiny={tmp_path}",
         "--max_candidates=2", "--num_prompts=1", f"--out_json={tmp_path / 'out.json'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert f"--model='tiny={tmp_path}': no sana_config.json in {tmp_path}" in result.stderr
    assert not (tmp_path / "out.json").exists()

"""Candidate sampling (noise per prompt and candidate, vmapped, chunked) and the sampling CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sana_jax import checkpoint, model, sample, sampling
from sana_jax.scaling import search
from sana_jax.scaling.candidates import generate_candidates

# The shapes data: 32 px images -> 8x8x48 latents, 16 x 64 text features.
CONFIG = dataclasses.replace(model.preset("tiny"), in_channels=48, out_channels=48, caption_channels=64)
SAMPLING = dict(height=8, width=8, num_steps=3, guidance_scale=4.5, shift=3.0)
NUM_PROMPTS, NUM_CANDIDATES, TEXT_LENGTH = 2, 3, 16


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(model.init_params, static_argnums=0)(CONFIG, jax.random.key(0))  # Eager init is slow.
    rng = np.random.default_rng(0)
    text = rng.normal(size=(NUM_PROMPTS, TEXT_LENGTH, 64)).astype(np.float32)
    mask = (np.arange(TEXT_LENGTH) < np.array([[5], [11]])).astype(np.int32)
    null = (np.zeros((TEXT_LENGTH, 64), np.float32), np.zeros((TEXT_LENGTH,), np.int32))
    key = jax.random.key(7)
    latents = generate_candidates(params, CONFIG, text, mask, *null, key, num_candidates=NUM_CANDIDATES,
                                  **SAMPLING)
    return params, text, mask, null, key, latents


def test_shape_and_candidates_differ(setup):
    *_, latents = setup
    assert latents.shape == (NUM_PROMPTS, NUM_CANDIDATES, 8, 8, 48)
    assert np.all(np.isfinite(latents))
    for p in range(NUM_PROMPTS):
        for i in range(NUM_CANDIDATES):
            for j in range(i):
                assert np.abs(latents[p, i] - latents[p, j]).max() > 1e-2


def test_chunked_and_single_candidate_calls_reproduce_each_candidate(setup):
    params, text, mask, null, key, latents = setup
    # Prompt 1 alone in chunks of 2 (the last chunk padded): the same candidates as the one-call batch.
    chunked = generate_candidates(params, CONFIG, text[1:], mask[1:], *null, key, num_candidates=NUM_CANDIDATES,
                                  chunk_size=2, prompt_ids=[1], **SAMPLING)
    np.testing.assert_allclose(chunked[0], latents[1], atol=1e-5)
    # Candidate 2 of prompt 0, generated alone.
    single = generate_candidates(params, CONFIG, text[:1], mask[:1], *null, key, num_candidates=1,
                                 chunk_size=2, prompt_ids=[0], first_candidate=2, **SAMPLING)
    np.testing.assert_allclose(single[0, 0], latents[0, 2], atol=1e-5)


def test_vmapped_candidates_match_a_loop_of_generate_calls(setup):
    """`sampling.generate` draws its own noise: from fold_in(fold_in(key, p), i) it must give candidate i."""
    params, text, mask, null, key, latents = setup
    for p in range(NUM_PROMPTS):
        for i in range(NUM_CANDIDATES):
            candidate_key = jax.random.fold_in(jax.random.fold_in(key, p), i)
            reference = sampling.generate(params, CONFIG, text[p:p + 1], mask[p:p + 1], *null, candidate_key,
                                          **SAMPLING)
            np.testing.assert_allclose(latents[p, i], reference[0], atol=1e-5)


class _FixedScores:
    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float32)

    def score(self, images, prompts):
        assert len(images) == len(prompts) == len(self.scores)
        return self.scores


def test_judge_keeps_the_highest_scores():
    images = np.zeros((5, 4, 4, 3), np.float32)
    scores, kept = sample.judge(_FixedScores([0.2, 0.9, 0.1, 0.95, 0.9]), images, "a red circle", 3, "best_of_n")
    np.testing.assert_array_equal(scores, np.float32([0.2, 0.9, 0.1, 0.95, 0.9]))
    np.testing.assert_array_equal(kept, [3, 1, 4])  # Best first; the tie keeps the lower index first.


@pytest.mark.parametrize("flags, words", [
    (["--num_candidates=2", "--keep=3"], ["--keep=3", "--num_candidates=2"]),
    (["--verifier=oracle"], ["oracle", "checker", "vlm"]),
    (["--method=knockout"], ["knockout", "vlm"]),
])
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([f"--checkpoint={tmp_path}", "--prompt=a red circle", f"--out={tmp_path}", *flags])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert all(word in message for word in words), message


def test_missing_checkpoint_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([f"--checkpoint={tmp_path / 'absent'}", "--prompt=a red circle", f"--out={tmp_path}"])
    assert exit_info.value.code != 0
    assert "absent" in capsys.readouterr().err


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sana_jax.sample", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_end_to_end(setup, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    checkpoint.save(ckpt, CONFIG, setup[0])
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("two triangles\n\na blue triangle\n")
    num_candidates, keep = 4, 2
    result = _run_cli(f"--checkpoint={ckpt}", "--prompt=a red circle", f"--prompts_file={prompts_file}",
                      f"--num_candidates={num_candidates}", f"--keep={keep}", "--verifier=checker", "--num_steps=2",
                      "--chunk_size=3", f"--out={out}")
    assert result.returncode == 0, result.stderr

    report = json.loads((out / "scores.json").read_text())
    assert [entry["prompt"] for entry in report["prompts"]] == ["a red circle", "two triangles", "a blue triangle"]
    for p, entry in enumerate(report["prompts"]):
        assert len(entry["scores"]) == num_candidates
        assert set(entry["scores"]) <= {0.0, 1.0}  # The checker's verdicts.
        assert entry["selected"] == search.best_of_n(np.array([entry["scores"]]), keep)[0].tolist()
        assert entry["files"] == [f"p{p:03d}_keep{r}.png" for r in range(keep)]
        for name in [*entry["files"], f"p{p:03d}_sheet.png"]:
            assert (out / name).stat().st_size > 0

    bad = _run_cli(f"--checkpoint={ckpt}", "--prompt=a red circle", "--num_candidates=2", "--keep=5",
                   f"--out={tmp_path / 'bad'}")
    assert bad.returncode != 0
    assert "--keep=5" in bad.stderr and "--num_candidates=2" in bad.stderr
    assert not (tmp_path / "bad").exists()


_SHARDED_CHECK = """
import dataclasses, jax, numpy as np
from sana_jax import model
from sana_jax.scaling.candidates import generate_candidates
config = dataclasses.replace(model.preset("tiny"), in_channels=48, out_channels=48, caption_channels=64)
params = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
text = np.random.default_rng(0).normal(size=(1, 16, 64)).astype(np.float32)
null = (np.zeros((16, 64), np.float32), np.zeros((16,), np.int32))
kw = dict(num_candidates=6, height=8, width=8, num_steps=2, chunk_size=4)
one_device = generate_candidates(params, config, text, np.ones((1, 16), np.int32), *null, jax.random.key(3), **kw)
mesh = jax.make_mesh((4,), ("data",))
sharded = generate_candidates(params, config, text, np.ones((1, 16), np.int32), *null, jax.random.key(3),
                              mesh=mesh, **kw)
assert len(jax.devices()) == 4
np.testing.assert_allclose(sharded, one_device, atol=1e-5)
"""


@pytest.mark.slow
def test_candidates_sharded_over_four_devices_match_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr

"""Faults a demanding user runs into: nothing silently wrong, nothing lost, every bad input one line.

docs/reliability.md lists each case and what a user sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict
from PIL import Image
from test_train import assert_trees_close, read_metrics, tiny_config

from sana_jax import checkpoint, convert, model, sample
from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import prepare, shapes
from sana_jax.optim import came
from sana_jax.scaling import candidates
from sana_jax.text_encoder import WordTextEncoder
from sana_jax.trainer import run, train

ROOT = Path(__file__).resolve().parents[1]

# The shapes data: 32 px images -> 8x8x48 latents, 16 x 64 text features.
MODEL = dataclasses.replace(model.preset("tiny"), in_channels=48, out_channels=48, caption_channels=64)


def tiny(**changes) -> ConfigDict:
    """test_train's tiny training config: 4 steps, checkpoints at steps 2 and 4."""
    return tiny_config(**{"steps": 4, "checkpoint_every": 2, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run: checkpoints at steps 2 and 4, model/ and the final params."""
    workdir = tmp_path_factory.mktemp("trained")
    _, params = train(tiny(), workdir)
    return workdir, params


def _copy(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir, tmp_path / "run"))


# 1. A rerun with another model is refused, naming the fields; resume_saved_model continues deliberately.

def test_rerun_with_another_model_is_refused(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    with pytest.raises(ValueError, match=r"depth: saved 2, config 3.*resume_saved_model"):
        train(tiny(**{"model.overrides.depth": 3}), workdir)
    grow = tiny()
    with grow.unlocked():
        grow.growth = {"target_depth": 4, "strategy": "partial_preservation", "keep": -1, "zero_copies": False,
                       "base_checkpoint": str(trained[0] / "model")}
    with pytest.raises(ValueError, match=r"depth: saved 2, config 4"):
        run(grow, workdir)
    config, _ = train(tiny(resume_saved_model=True, **{"model.overrides.depth": 3}), workdir)
    assert config.depth == 2


# 2. model/ is rewritten, atomically, whenever it is not the final weights of the run.

def test_model_follows_a_longer_run(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    _, params = train(tiny(steps=6), workdir)
    _, saved = checkpoint.load(workdir / "model")
    assert_trees_close(saved, params, atol=0)
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == []  # no partial copies left


def test_half_written_model_is_repaired(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    (workdir / "model" / checkpoint.CONFIG_FILE).unlink()  # killed before the last file
    train(tiny(), workdir)
    _, saved = checkpoint.load(workdir / "model")
    assert_trees_close(saved, trained[1], atol=0)


# 3. A corrupt latest checkpoint: resume from the newest restorable one, with a one-line warning.

def _truncate_largest_array_file(step_dir: Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, lambda step: (step / "state" / "_METADATA").unlink()],
                         ids=["truncated_array_file", "missing_METADATA"])
def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path, caplog, damage):
    workdir = _copy(trained[0], tmp_path)
    damage(workdir / "checkpoints" / "4")
    _, params = train(tiny(), workdir)
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "\n" not in warnings[0], warnings
    assert "resuming from step 2" in warnings[0]
    assert_trees_close(params, trained[1], atol=1e-6)
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    params = jax.jit(model.init_params, static_argnums=0)(MODEL, jax.random.key(0))
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    checkpoint.save(path, MODEL, params)
    return path, params


# 4. checkpoint.load: a config whose depth disagrees with the stored params fails at load, saying so.

def test_load_refuses_a_config_that_disagrees_with_its_params(tiny_checkpoint, tmp_path):
    path = Path(shutil.copytree(tiny_checkpoint[0], tmp_path / "ckpt"))
    config_file = path / checkpoint.CONFIG_FILE
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "depth": 3}))
    with pytest.raises(ValueError, match=r"depth=3.*2 blocks"):
        checkpoint.load(path)


# 5. The optimizer's learning rate.

@pytest.mark.parametrize("lr", [-1e-2, 0.0, math.nan, math.inf])
def test_came_refuses_a_bad_learning_rate(lr):
    with pytest.raises(ValueError, match=f"learning_rate={lr!r}"):
        came(lr)


def test_came_takes_schedules():
    came(optax.linear_schedule(0.0, 1e-3, 10))
    came(np.float32(1e-3))


# 6. tools/prepare_data.py: bad captions are skipped and counted like bad images; fixing one resumes.

def test_bad_caption_is_skipped_and_fixing_it_resumes(tmp_path):
    folder = tmp_path / "collection"
    folder.mkdir()
    for i in range(3):
        sample_ = shapes.make_sample(5, i)
        Image.fromarray(sample_.image).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a red blob" if i == 1 else sample_.prompt)
    kwargs = dict(autoencoder=SpaceToDepthAE(), text_encoder=WordTextEncoder(), resolution=32, shard_size=2)
    metadata = prepare.prepare(*prepare.read_collection(folder)[:1], tmp_path / "out", **kwargs)
    assert metadata["num_records"] == 2
    [(path, reason)] = metadata["skipped"]
    assert path == str(folder / "img1.png") and "'blob'" in reason and "\n" not in reason
    (folder / "img1.txt").write_text("a red circle")
    metadata = prepare.prepare(*prepare.read_collection(folder)[:1], tmp_path / "out", **kwargs)
    assert metadata["num_records"] == 3 and metadata["skipped"] == []


# 7. tools/convert.py: --force never deletes what it did not write; a truncated file is one line.

def _convert(capsys, *argv) -> tuple[int, str]:
    code = convert.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_convert_force_refuses_what_it_did_not_write(tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "root"
    src = Path(shutil.copytree(tiny_checkpoint[0], root / "ckpt"))
    (root / "notes.txt").write_text("mine")
    for dst, words in [(root, ["parent of", "ckpt"]), (src, ["is the source"]),
                       (tmp_path / "other", ["notes.txt", "did not write"])]:
        if dst.name == "other":
            shutil.copytree(root, dst)
        code, err = _convert(capsys, "orbax-to-diffusers", src, dst, "--force")
        assert code != 0 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert (root / "notes.txt").read_text() == "mine" and (tmp_path / "other" / "notes.txt").exists()
    checkpoint.load(src)
    for _ in range(2):  # replacing its own earlier output is what --force is for
        code, err = _convert(capsys, "orbax-to-diffusers", src, tmp_path / "out", "--force")
        assert code == 0, err


def test_convert_names_a_truncated_safetensors_file(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "diffusers"
    convert.write_diffusers(folder, MODEL, tiny_checkpoint[1])
    [weights] = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _convert(capsys, "diffusers-to-orbax", folder, tmp_path / "out")
    assert code != 0 and len(err.strip().splitlines()) == 1 and weights.name in err, err
    assert not (tmp_path / "out").exists()


# 8. python -m sana_jax.sample.

def test_prompts_are_normalised_for_the_shapes_vocabulary():
    encoder = WordTextEncoder()
    for a, b in zip(encoder.encode_text(["A Red Circle."]), encoder.encode_text(["a red circle"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert shapes.parse_prompt("Two triangles!") == shapes.parse_prompt("two triangles")


def test_sample_refuses_a_negative_guidance_scale(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([f"--checkpoint={tiny_checkpoint[0]}", "--prompt=a red circle", f"--out={tmp_path}",
                           "--guidance_scale=-1"])
    assert exit_info.value.code != 0 and "--guidance_scale=-1.0" in capsys.readouterr().err


def test_sample_reports_a_bad_prompt_before_writing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--checkpoint={tiny_checkpoint[0]}", "--prompt=a red circle", "--prompt=a red blob",
                     "--num_candidates=1", "--num_steps=1", f"--out={out}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "prompt 1" in err and "'blob'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_candidates_are_chunked_to_fit_memory_with_progress(tiny_checkpoint, monkeypatch, capsys):
    assert candidates.chunk_size_for_memory(bytes_needed=1000, num_candidates=10, available=450) == 4
    assert candidates.chunk_size_for_memory(bytes_needed=1000, num_candidates=10, available=10**6) == 10
    assert candidates.chunk_size_for_memory(bytes_needed=1000, num_candidates=10, available=0) == 1
    params = tiny_checkpoint[1]
    text, mask = WordTextEncoder().encode_text(["a red circle"])
    null = tuple(x[0] for x in WordTextEncoder().encode_text([""]))
    kwargs = dict(num_candidates=3, height=8, width=8, num_steps=1)
    whole = candidates.generate_candidates(params, MODEL, text, mask, *null, jax.random.key(1), chunk_size=3, **kwargs)
    sizes, chunk_size_for_memory = [], candidates.chunk_size_for_memory
    monkeypatch.setattr(candidates, "chunk_size_for_memory", lambda **kw: sizes.append(chunk_size_for_memory(**kw))
                        or sizes[-1])
    monkeypatch.setattr(candidates, "memory_budget", lambda device: 0)
    chunked = candidates.generate_candidates(params, MODEL, text, mask, *null, jax.random.key(1), progress=True,
                                             **kwargs)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert sizes == [1] and "candidates" in capsys.readouterr().err  # one at a time, with a progress bar


# 9. SIGINT and SIGTERM during training: a checkpoint at the current step, one line, an exact resume.

SIGNAL_CHANGES = {"steps": 20, "checkpoint_every": 2, "async_checkpointing": True}
SIGNAL_CONFIG = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_train import tiny_config


def get_config():
    return tiny_config(**{SIGNAL_CHANGES!r})
"""


def _train_command(config: Path, workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "sana_jax.train", f"--config={config}", f"--workdir={workdir}", *flags]


@pytest.fixture(scope="module")
def signal_reference(tmp_path_factory):
    """The command the signal tests interrupt, and the params and metrics of an uninterrupted run."""
    folder = tmp_path_factory.mktemp("signals")
    config = folder / "config.py"
    config.write_text(SIGNAL_CONFIG)
    _, params = train(tiny_config(**SIGNAL_CHANGES), folder / "reference")
    return config, params, read_metrics(folder / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_the_same_command_resumes_exactly(signal_reference, tmp_path, signum):
    config, reference_params, reference_metrics = signal_reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_train_command(config, workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "asyncio" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    step = int(last.removeprefix("stopped at step ").split(";")[0])
    assert last == f"stopped at step {step}; the same command resumes" and 3 <= step < SIGNAL_CHANGES["steps"], last
    assert str(step) in os.listdir(workdir / "checkpoints")

    resumed = subprocess.run(_train_command(config, workdir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {step}" in resumed.stdout
    assert_trees_close(checkpoint.load(workdir / "model")[1], reference_params, atol=1e-6)
    assert [m["loss"] for m in read_metrics(workdir)] == pytest.approx([m["loss"] for m in reference_metrics], rel=1e-6)


# 10. User errors in the training command: one line naming the bad value, non-zero exit, no traceback.

def _without_privileges() -> list[str]:
    """A command prefix under which file permissions apply, also to root (which may write anywhere)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop the capability of writing anywhere")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


@pytest.mark.parametrize("case", ["missing config", "unknown field", "bad value", "workdir is a file",
                                  "read-only workdir"])
def test_training_command_user_errors_are_one_line(case, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    config, workdir, extra, prefix = str(ROOT / "configs" / "pretrain.py"), tmp_path / "w", [], []
    if case == "missing config":
        config, expected = str(tmp_path / "missing.py"), "missing.py"
    elif case == "unknown field":
        extra, expected = ["--config.nonsense=1"], "--config.nonsense"
    elif case == "bad value":
        extra, expected = ["--config.steps=0"], "config.steps=0"
    elif case == "workdir is a file":
        workdir, expected = a_file, str(a_file)
    else:
        (tmp_path / "read_only").mkdir(mode=0o555)
        workdir, prefix = tmp_path / "read_only" / "w", _without_privileges()
        expected = str(workdir)
    proc = subprocess.run([*prefix, *_train_command(Path(config), workdir, *extra)], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]

"""Two processes on localhost (one CPU device each, gloo collectives) train exactly like one process with two
devices reading the same global batches; only process 0 writes metrics and samples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sana_jax import checkpoint
from sana_jax.trainer.loop import CHECKPOINT_DIR, MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# Both sides compile alike; a low XLA backend optimization level halves the compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
INHERITED = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
             "JAX_PROCESS_ID")

CONFIG_FILE = f"""
from sana_jax.trainer.config import default_config


def get_config():
    c = default_config()
    c.steps = {STEPS}
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_batches = 0
    c.model.overrides = {{"depth": 2, "num_heads": 2, "head_dim": 8, "cross_num_heads": 2, "cross_head_dim": 8}}
    c.optimizer.warmup_steps = 1
    c.sampling.num_prompts = 2
    c.sampling.grid_size = 2
    c.sampling.num_steps = 2
    c.sampling.solver = "euler"
    return c
"""

# One process, two devices: each global batch is process 0's rows followed by process 1's, as the two
# processes assemble it with `jax.make_array_from_process_local_data`.
REFERENCE_SCRIPT = """
import importlib.util
import sys

import numpy as np

from sana_jax.data import pipeline
from sana_jax.trainer import loop


def both_halves(config, *, seed, batch_size, process_index, process_count, **kwargs):
    halves = [pipeline.make_dataset(config, seed=seed, batch_size=batch_size, process_index=i, process_count=2,
                                    **kwargs) for i in range(2)]
    merged = halves[0].map_with_index(
        lambda i, first: {k: np.concatenate([first[k], halves[1][i][k]]) for k in first})
    return iter(merged.to_iter_dataset())


loop.make_train_iterator = both_halves
spec = importlib.util.spec_from_file_location("tiny_config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.sampling.num_prompts = 0  # only losses and params are compared
loop.run(config, sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a CPU process with `devices` devices, whatever device count this one forces."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


def _run_all(commands: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float) -> None:
    """Runs the commands concurrently; on the first failure (or the timeout) kills the rest and fails."""
    logs.mkdir()
    procs = []
    for i, (argv, env) in enumerate(commands):
        with open(logs / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        pytest.fail("\n\n".join(f"command {i} exited with {p.returncode}:\n{(logs / f'{i}.log').read_text()[-3000:]}"
                                for i, p in enumerate(procs)))


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    config_path = tmp_path / "tiny.py"
    config_path.write_text(CONFIG_FILE)
    single, multi = tmp_path / "one_process", tmp_path / "two_processes"
    train = [sys.executable, "-m", "sana_jax.train", f"--config={config_path}", f"--workdir={multi}"]
    distributed = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    _run_all([
        ([sys.executable, "-c", REFERENCE_SCRIPT, str(config_path), str(single)], _env(devices=2)),
        (train, _env(devices=1, **distributed, JAX_PROCESS_ID="0")),
        (train, _env(devices=1, **distributed, JAX_PROCESS_ID="1")),
    ], tmp_path / "logs", timeout=600)

    # Process 0 alone wrote the metrics (one row per step), the TensorBoard events and the sample grid.
    rows = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "sample_accuracy" in r] == [STEPS]
    assert len(list((multi / "tensorboard").iterdir())) == 1
    assert [p.name for p in (multi / "samples").iterdir()] == [f"step_{STEPS:06d}.png"]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=0, atol=1e-5)

    # One checkpoint per save step, holding both processes' data-iterator states.
    assert sorted(p.name for p in (multi / CHECKPOINT_DIR).iterdir()) == ["2", str(STEPS)]
    assert sorted(p.name for p in (multi / CHECKPOINT_DIR / str(STEPS) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    _, params = checkpoint.load(multi / MODEL_DIR)
    _, reference = checkpoint.load(single / MODEL_DIR)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)

    # The last training checkpoint restores (here on one device) to the final params.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager((multi / CHECKPOINT_DIR).absolute(),
                               item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        stored = manager.item_metadata(STEPS).state
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
        state = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

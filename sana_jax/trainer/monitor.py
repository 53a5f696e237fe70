"""What a run records: metrics.jsonl, TensorBoard events and throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    Only process 0 writes. On resume, lines past the restored step are dropped so that the file reads as
    one uninterrupted run.
    """

    def __init__(self, workdir: Path, *, resume_step: int, stage: str = ""):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.stage = stage
        self._tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **({"stage": self.stage} if self.stage else {}),
                  **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Steps/s and images/s since the last call."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._time, self._steps = time.perf_counter(), 0

    def update(self, steps: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = (steps - self._steps) / max(now - self._time, 1e-9)
        self._time, self._steps = now, steps
        return {"steps_per_s": rate, "images_per_s": rate * self.batch_size}


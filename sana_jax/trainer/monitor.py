"""What a run shows: metrics.jsonl, TensorBoard events, throughput, and sample grids with verdicts."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw


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


def save_grid(path: Path, images: np.ndarray, prompts: list[str], *, verdicts: list[bool] | None = None,
              title: str = "", scale: int = 3) -> None:
    """A PNG grid of images with their prompts (and a green/red frame for checker verdicts)."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    size = images.shape[1] * scale
    cell_w, cell_h = max(size, 150) + 8, size + 40
    top = 18 if title else 0
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h + top), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + top + 4
        tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        canvas.paste(tile.resize((size, size), Image.NEAREST), (x, y))
        if verdicts is not None:
            draw.rectangle((x - 2, y - 2, x + size + 1, y + size + 1), outline="green" if verdicts[i] else "red",
                           width=2)
        words, line, lines = prompt.split(), "", []
        for word in words:
            if len(line) + len(word) > 26:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x, y + size + 2), "\n".join(lines[:3]), fill="black", spacing=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

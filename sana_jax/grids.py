"""PNG grids of images with their captions, and optionally a green or red frame for each verdict."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PAD = 8  # pixels between cells and around the grid
_LINE = 15  # caption line height in pixels, for the 12 px font


def save_grid(path: str | Path, images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str], *,
              verdicts: Sequence[bool] | None = None, title: str = "", scale: int = 3, columns: int = 4) -> None:
    """Writes a PNG grid of square images, each upscaled `scale` times (nearest) above its wrapped caption.

    Args:
      path: the PNG file (its folder is created).
      images: N images (S, S, 3), uint8 or float in [0, 1].
      captions: N captions.
      verdicts: N checker verdicts, drawn as a green (True) or red (False) frame.
      title: a line above the grid.
      scale: upscaling factor of the images.
      columns: images per row (fewer when there are fewer images).
    """
    font = ImageFont.load_default(size=12)
    cols = min(len(images), columns)
    rows = math.ceil(len(images) / cols)
    side = images[0].shape[0] * scale
    cell_w = max(side, 150)  # room for a caption under small images
    lines = [textwrap.wrap(caption, max(cell_w // 7, 12)) for caption in captions]
    cell_h = side + _LINE * max(len(caption) for caption in lines) + 6
    top = 18 if title else 0
    canvas = Image.new("RGB", (cols * (cell_w + _PAD) + _PAD, top + rows * (cell_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, 3), title, fill="black", font=font)
    for i, (image, caption) in enumerate(zip(images, lines, strict=True)):
        x, y = _PAD + (i % cols) * (cell_w + _PAD), top + _PAD + (i // cols) * (cell_h + _PAD)
        pixels = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST), (x, y))
        if verdicts is not None:
            draw.rectangle((x - 2, y - 2, x + side + 1, y + side + 1), outline="green" if verdicts[i] else "red",
                           width=2)
        for j, line in enumerate(caption):
            draw.text((x, y + side + 3 + _LINE * j), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

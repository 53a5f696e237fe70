"""Reading images for the autoencoders: square, RGB, at the training resolution."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def fit_image(image: Image.Image | np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crops to a square and resizes: any RGB/L/RGBA image -> (resolution, resolution, 3) uint8."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image, np.uint8)


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """Reads an image file as (resolution, resolution, 3) uint8; raises OSError if it cannot be read."""
    with Image.open(path) as image:
        image.load()
        return fit_image(image, resolution)

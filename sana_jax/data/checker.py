"""A programmatic judge for the shapes domain: does an image satisfy a prompt?

The image is segmented against a fitted background (a plane per colour channel), foreground pixels
are grouped into connected components, and each component gets a colour (nearest palette entry of
its core pixels) and a shape (from its anti-aliased coverage: how lopsided it is vertically and how
much of its extent it fills). The prompt is parsed back into its spec and judged with the task
rules of `shapes.satisfies`, the same rules that hold for the renderer's ground truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from sana_jax.data import shapes

# Pixel distance (0-255 RGB) from the background above which a pixel belongs to an object.
_FOREGROUND = 40.0
# Core pixels of a component: within this fraction of its largest distance from the background.
_CORE = 0.85
# A component's core colour must lie this close (RGB distance) to a palette colour to be named.
_COLOR_MATCH = 70.0
# Components covering less than this fraction of the image are noise.
_MIN_AREA = 0.01
# Shape boundaries. Vertical skewness of the coverage: triangle (apex up) -0.57, the others 0.
# Fill (area / (widest row * tallest column)): square 1, circle pi/4, diamond 1/2; on rendered
# 32 px images these measure 0.99-1.0, 0.77-0.82 and 0.54-0.64.
_SKEW_TRIANGLE = -0.3
_FILL_SQUARE = 0.9
_FILL_CIRCLE = 0.7

_PALETTE_NAMES = tuple(shapes.COLORS)
_PALETTE = np.array([shapes.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The checker's answer for one prompt-image pair, with its evidence."""

    ok: bool
    task: str
    reason: str
    objects: tuple[shapes.SceneObject, ...]


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 in [0, 255] or float in [0, 1] -> float64 in [0, 255]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64)
    return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0


def _fit_background(image: np.ndarray) -> np.ndarray:
    """Least-squares plane per channel through the unsaturated pixels: (H, W, 3)."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], axis=1)
    pixels = image.reshape(-1, 3)
    neutral = np.ptp(pixels, axis=1) < 40.0
    if neutral.sum() < 0.1 * h * w:  # no clear background: fall back to the border's median
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        return np.broadcast_to(np.median(border, axis=0), image.shape)
    coeffs, *_ = np.linalg.lstsq(design[neutral], pixels[neutral], rcond=None)
    return (design @ coeffs).reshape(h, w, 3)


def _classify(alpha: np.ndarray) -> str:
    """Shape name from a component's coverage map (h, w) in [0, 1]."""
    area = alpha.sum()
    rows = np.arange(alpha.shape[0], dtype=np.float64)
    weights = alpha.sum(axis=1) / area
    mean = (weights * rows).sum()
    var = (weights * (rows - mean) ** 2).sum()
    skew = (weights * (rows - mean) ** 3).sum() / max(var, 1e-12) ** 1.5
    if skew < _SKEW_TRIANGLE:
        return "triangle"
    fill = area / (alpha.sum(axis=1).max() * alpha.sum(axis=0).max())
    if fill > _FILL_SQUARE:
        return "square"
    return "circle" if fill > _FILL_CIRCLE else "diamond"


def detect(image: np.ndarray) -> tuple[shapes.SceneObject, ...]:
    """Finds the objects in an image: (H, W, 3) uint8, or float in [0, 1].

    Returns objects in raster order of their top-left pixel; `color` is None for a component whose
    colour is not in the palette. A box spans the pixels covered at least half as much as the
    component's best-covered pixel.
    """
    image = _as_rgb255(image)
    h, w, _ = image.shape
    background = _fit_background(image)
    diff = image - background
    distance = np.linalg.norm(diff, axis=-1)
    labels, _ = ndimage.label(distance > _FOREGROUND, structure=np.ones((3, 3)))
    grown = ndimage.grey_dilation(labels, size=(3, 3))  # take in the faint anti-aliased rim
    grown = np.where(labels > 0, labels, grown)
    found = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        window = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in window)
        own = grown[window] == index
        dist = np.where(labels[window] == index, distance[window], 0.0)
        core = dist >= _CORE * dist.max()
        rgb = image[window][core].mean(axis=0)
        away = rgb - background[window][core].mean(axis=0)
        alpha = np.clip((diff[window] @ away) / (away @ away), 0.0, 1.0) * own
        if alpha.sum() < _MIN_AREA * h * w:
            continue
        palette_dist = np.linalg.norm(_PALETTE - rgb, axis=1)
        color = _PALETTE_NAMES[palette_dist.argmin()] if palette_dist.min() < _COLOR_MATCH else None
        rows, cols = np.nonzero(alpha >= 0.5 * alpha.max())
        y0, x0 = window[0].start + rows.min(), window[1].start + cols.min()
        y1, x1 = window[0].start + rows.max() + 1, window[1].start + cols.max() + 1
        box = (float(x0), float(y0), float(x1), float(y1))
        found.append(shapes.SceneObject(_classify(alpha), color, box))
    return tuple(found)


def check_detail(prompt: str, image: np.ndarray) -> Verdict:
    """Judges whether `image` satisfies `prompt` (a prompt of the shapes grammar)."""
    spec = shapes.parse_prompt(prompt)
    objects = detect(image)
    ok, reason = shapes.satisfies(spec, objects)
    return Verdict(ok, spec.task, reason, objects)


def check(prompt: str, image: np.ndarray) -> bool:
    """Whether `image` satisfies `prompt` (see `check_detail` for the evidence)."""
    return check_detail(prompt, image).ok

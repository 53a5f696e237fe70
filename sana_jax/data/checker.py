"""A programmatic judge for the shapes domain: does an image satisfy a prompt?

It plays the part of GenEval's detector with a confidence threshold. The image is segmented against
a fitted background (a plane per colour channel), foreground pixels are grouped into connected
components, and each component is measured: its colour (core pixels), its coverage (anti-aliased
opacity), the best-fitting ideal shape and box (from the coverage's moments), and how cleanly it
stands out. A component is a confident object only if it is a solid, uniformly coloured, saturated
shape of plausible size that fits its ideal mask and contrasts with its surroundings; every other
foreground pixel is clutter, and an image with more than a trace of clutter satisfies no prompt.
The prompt is parsed back into its spec and judged with the task rules of `shapes.satisfies`, the
same rules that hold for the renderer's ground truth.
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

# What makes a component a confident object.
_MIN_AREA = 0.01  # coverage, as a fraction of the image area
_SIDE = (0.15, 0.5)  # box sides, as fractions of the image side (the renderer draws 0.21-0.38)
_MAX_ASPECT = 1.5  # longer over shorter box side (the renderer's boxes are square)
_MAX_BLUR = 0.12  # blur sigma of the fitted shape, as a fraction of its box's shorter side
_MIN_FIT = 0.75  # soft IoU of the coverage with the ideal shape in the fitted box
_MAX_SPREAD = 30.0  # RMS distance (0-255 RGB) of its pixels from one colour over the background
_MIN_CHROMA = 80.0  # largest minus smallest channel of the colour (the palette's are 125-220)
_MIN_CONTRAST = 100.0  # RGB distance from the colour of the surrounding ring of pixels
# Clutter: pixels this far from the background (after smoothing by this sigma in pixels) that no
# confident object explains; more than this fraction of the image rejects the image.
_CLUTTER_LEVEL = 20.0
_CLUTTER_SMOOTHING = 0.7
_MAX_CLUTTER = 0.01
_PAD = 3  # pixels measured around a component: its rim, its footprint's margin and the ring beyond

# Moments of each ideal shape drawn in a w x h box: area / (w h), variance of x over w^2 and of y
# over h^2, and the centroid's offset below the box centre over h (the triangle's apex is up).
_MOMENTS = {
    "circle": (np.pi / 4, 1 / 16, 1 / 16, 0.0),
    "square": (1.0, 1 / 12, 1 / 12, 0.0),
    "triangle": (0.5, 1 / 24, 1 / 18, 1 / 6),
    "diamond": (0.5, 1 / 24, 1 / 24, 0.0),
}

_PALETTE_NAMES = tuple(shapes.COLORS)
_PALETTE = np.array([shapes.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)


# Why an image is rejected: clutter, or a named object missing, a wrong count or a wrong relation.
FAILURES = ("clutter", "missing", "count", "relation")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The checker's answer for one prompt-image pair, with its evidence.

    `objects` are the confident objects; `clutter` is the fraction of the image's pixels that stand
    out from the background but belong to no confident object. `failure` is "" for an accepted image,
    else one of `FAILURES`: too much clutter, or what `shapes.unmet_part` finds wrong.
    """

    ok: bool
    task: str
    reason: str
    objects: tuple[shapes.SceneObject, ...]
    clutter: float
    failure: str


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A foreground component with the measurements that decide whether it is a confident object."""

    object: shapes.SceneObject
    window: tuple[slice, slice]  # the part of the image measured
    footprint: np.ndarray  # bool over the window: the pixels the object explains
    area: float  # coverage, as a fraction of the image area
    sides: tuple[float, float]  # box width and height, as fractions of the image side
    blur: float  # Gaussian blur of the fitted ideal shape, as a fraction of its box's shorter side
    fit: float  # soft IoU with the ideal shape
    spread: float  # RMS distance of its pixels from its colour composited over the background
    chroma: float  # largest minus smallest channel of its colour
    contrast: float  # RGB distance of its colour from the median of the ring around it

    @property
    def confident(self) -> bool:
        short, long = sorted(self.sides)
        return (self.area >= _MIN_AREA and _SIDE[0] <= short and long <= _SIDE[1]
                and long <= _MAX_ASPECT * short and self.blur <= _MAX_BLUR and self.fit >= _MIN_FIT
                and self.spread <= _MAX_SPREAD and self.chroma >= _MIN_CHROMA
                and self.contrast >= _MIN_CONTRAST)


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


def _fit_shape(alpha: np.ndarray) -> tuple[str, tuple[float, float, float, float], float, float]:
    """The ideal shape, possibly softened by a Gaussian blur, that best explains a coverage map (H, W).

    Blurring keeps the coverage's sum and adds its variance s^2 to each axis' variance. For each
    shape, its area and axis variances (less the 1/12 px^2 that sampling at pixel centres adds) give
    the box width w, height h and blur s (s = 0 if the moments need no blur), and the box's place
    follows from the centroid. The fit is the soft IoU sum(min) / sum(max) of the coverage with the
    shape's blurred ideal coverage. Returns (shape, box, blur sigma in pixels, fit).
    """
    h, w = alpha.shape
    area = alpha.sum()
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    col, row = alpha.sum(axis=0) / area, alpha.sum(axis=1) / area
    cx, cy = col @ xs, row @ ys
    var_x = max(col @ (xs - cx) ** 2 - 1 / 12, 1e-6)
    var_y = max(row @ (ys - cy) ** 2 - 1 / 12, 1e-6)
    best = None
    for shape, (fill, kx, ky, drop) in _MOMENTS.items():
        # fill^2 (var_x - s2) (var_y - s2) / (kx ky) = area^2 is a quadratic in s2; take its root
        # below min(var_x, var_y), where the box is real.
        product = (area / fill) ** 2 * kx * ky
        half_sum, half_diff = (var_x + var_y) / 2, (var_x - var_y) / 2
        s2 = half_sum - np.sqrt(half_diff**2 + product) if product < var_x * var_y else 0.0
        bw, bh = np.sqrt((var_x - s2) / kx), np.sqrt((var_y - s2) / ky)
        top = cy - drop * bh - bh / 2
        box = (cx - bw / 2, top, cx + bw / 2, top + bh)
        ideal = shapes.coverage(shape, box, max(h, w))[:h, :w]
        ideal = ndimage.gaussian_filter(ideal, np.sqrt(s2)) if s2 > 0 else ideal
        fit = np.minimum(alpha, ideal).sum() / np.maximum(alpha, ideal).sum()
        if best is None or fit > best[3]:
            best = (shape, tuple(float(v) for v in box), float(np.sqrt(s2)), float(fit))
    return best


def _candidates(image: np.ndarray) -> tuple[list[_Candidate], np.ndarray]:
    """The measured foreground components of an image (H, W, 3) in 0-255, and its clutter evidence.

    The evidence (H, W) bool marks the pixels that stand out from the background after a light
    Gaussian smoothing (which averages pixel noise away but keeps blotches).
    """
    h, w, _ = image.shape
    background = _fit_background(image)
    diff = image - background
    distance = np.linalg.norm(diff, axis=-1)
    labels, _ = ndimage.label(distance > _FOREGROUND)
    grown = ndimage.grey_dilation(labels, size=(3, 3))  # take in the faint anti-aliased rim
    grown = np.where(labels > 0, labels, grown)
    pixels = np.bincount(labels.ravel())
    side = max(h, w)
    found = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        if pixels[index] < _MIN_AREA * h * w / 2:  # a speck, never an object
            continue
        window = tuple(slice(max(s.start - _PAD, 0), min(s.stop + _PAD, n))
                       for s, n in zip(window, (h, w), strict=True))
        own = grown[window] == index
        dist = np.where(labels[window] == index, distance[window], 0.0)
        core = dist >= _CORE * dist.max()
        rgb = image[window][core].mean(axis=0)
        away = rgb - background[window][core].mean(axis=0)
        alpha = np.clip((diff[window] @ away) / (away @ away), 0.0, 1.0) * own
        shape, (x0, y0, x1, y1), blur, fit = _fit_shape(alpha)
        # How far the pixels stray from one colour composited over the background.
        spread = np.sqrt(((diff[window] - alpha[..., None] * away) ** 2).sum(axis=-1)[own].mean())
        footprint = ndimage.binary_dilation(own, np.ones((3, 3)))
        ring = ndimage.binary_dilation(footprint, np.ones((3, 3))) & ~footprint
        # A component that fills the whole image has no surroundings to contrast with.
        surround = np.median(image[window][ring], axis=0) if ring.any() else rgb
        palette_dist = np.linalg.norm(_PALETTE - rgb, axis=1)
        color = _PALETTE_NAMES[palette_dist.argmin()] if palette_dist.min() < _COLOR_MATCH else None
        top, left = window[0].start, window[1].start
        box = (left + x0, top + y0, left + x1, top + y1)
        found.append(_Candidate(
            object=shapes.SceneObject(shape, color, box), window=window, footprint=footprint,
            area=float(alpha.sum() / (h * w)), sides=((x1 - x0) / side, (y1 - y0) / side),
            blur=blur / min(x1 - x0, y1 - y0), fit=fit, spread=float(spread), chroma=float(np.ptp(rgb)),
            contrast=float(np.linalg.norm(rgb - surround))))
    smoothed = ndimage.gaussian_filter(diff, (_CLUTTER_SMOOTHING, _CLUTTER_SMOOTHING, 0))
    return found, np.linalg.norm(smoothed, axis=-1) > _CLUTTER_LEVEL


def _detect(image: np.ndarray) -> tuple[tuple[shapes.SceneObject, ...], float]:
    """The confident objects of an image (H, W, 3) in 0-255, and the fraction of it that is clutter."""
    found, salient = _candidates(image)
    objects = []
    for candidate in found:
        if candidate.confident:
            objects.append(candidate.object)
            salient[candidate.window] &= ~candidate.footprint
    return tuple(objects), float(salient.mean())


def detect(image: np.ndarray) -> tuple[shapes.SceneObject, ...]:
    """Finds the confident objects in an image: (H, W, 3) uint8, or float in [0, 1].

    Returns objects in raster order of their top-left pixel; `color` is None for an object whose
    colour is not in the palette; a box is the fitted box of the object's ideal shape.
    """
    return _detect(_as_rgb255(image))[0]


def check_detail(prompt: str, image: np.ndarray) -> Verdict:
    """Judges whether `image` satisfies `prompt` (a prompt of the shapes grammar)."""
    spec = shapes.parse_prompt(prompt)
    objects, clutter = _detect(_as_rgb255(image))
    if clutter > _MAX_CLUTTER:
        return Verdict(False, spec.task, f"clutter covers {clutter:.1%} of the image (at most "
                       f"{_MAX_CLUTTER:.0%} allowed)", objects, clutter, "clutter")
    ok, reason = shapes.satisfies(spec, objects)
    return Verdict(ok, spec.task, reason, objects, clutter, shapes.unmet_part(spec, objects))


def check(prompt: str, image: np.ndarray) -> bool:
    """Whether `image` satisfies `prompt` (see `check_detail` for the evidence)."""
    return check_detail(prompt, image).ok

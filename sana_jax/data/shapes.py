"""The shapes domain: a procedural text-to-image world with GenEval's six tasks.

Prompts come from a small grammar over shapes, colours, counts and relative positions; a renderer
draws an image that makes the prompt true. Every sample is a pure function of (seed, index).

Tasks and their prompt forms:
  single_object  "a circle"                    two_objects  "a circle and a square"
  counting       "three triangles" (1-4)        colors       "a red circle"
  position       "a circle left of a square"    color_attr   "a red circle and a blue square"

Image coordinates are pixels, x to the right and y down; a box is (x0, y0, x1, y1).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
# Palette in sRGB 0-255. Pairwise RGB distances are all above 84 (orange sits between red and
# yellow), several times the renderer's per-object jitter.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 120, 20),
    "yellow": (235, 205, 30),
    "green": (40, 165, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
MIN_SIZE = 32  # smallest image side the renderer and checker support

# Every word a prompt can contain, in a fixed order.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "and", "of", "left", "right", "above", "below"}
    | set(NUMBERS) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}))

# Renderer constants, as fractions of the image side.
_SIDE_FEW = (0.25, 0.38)  # object size for one or two objects
_SIDE_MANY = (0.21, 0.27)  # object size for three or four objects
_MARGIN = 0.04  # minimum distance from the image border
_GAP = 0.08  # minimum distance between object boxes
_SUPERSAMPLE = 4  # anti-aliasing: coverage sampled on a 4x4 grid per pixel
_COLOR_JITTER = 10  # per-channel uniform jitter of an object's colour
_POSITION_ALONG = 0.75  # rendered relations: direction component along the relation (checker: > 0.5)
_POSITION_ACROSS = 0.35  # and across it (checker: other relations need > 0.5)
_CANDIDATES = 32  # layouts drawn at once by the renderer


@dataclasses.dataclass(frozen=True)
class Thing:
    """A noun phrase of a prompt: a shape and an optional colour (None: any colour)."""

    shape: str
    color: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt.

    `count` is the exact number of `things[0]` for the counting task (1 otherwise);
    `relation` says where `things[0]` is relative to `things[1]` for the position task.
    """

    task: str
    things: tuple[Thing, ...]
    count: int = 1
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """An object in an image: shape, colour name (None if unrecognised) and box in pixels."""

    shape: str | None
    color: str | None
    box: tuple[float, float, float, float]

    @property
    def center(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return np.array([(x0 + x1) / 2, (y0 + y1) / 2])

    @property
    def size(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return np.array([x1 - x0, y1 - y0])


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of the domain: prompt text, its spec, the image (H, W, 3) uint8 and its objects."""

    prompt: str
    spec: PromptSpec
    image: np.ndarray
    objects: tuple[SceneObject, ...]


# ---------------------------------------------------------------------------------------------
# Grammar.


def _noun(thing: Thing) -> str:
    """The noun of a phrase, e.g. 'red circle' or 'circle'."""
    return f"{thing.color} {thing.shape}" if thing.color else thing.shape


def _noun_phrase(thing: Thing) -> str:
    """The phrase with its article, e.g. 'a red circle' or 'an orange square'."""
    noun = _noun(thing)
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def format_prompt(spec: PromptSpec) -> str:
    """Returns the prompt text of `spec`."""
    things = spec.things
    if spec.task == "counting":
        noun = things[0].shape if spec.count == 1 else things[0].shape + "s"
        return f"{NUMBERS[spec.count - 1]} {noun}"
    if spec.task == "position":
        return f"{_noun_phrase(things[0])} {spec.relation} {_noun_phrase(things[1])}"
    return " and ".join(_noun_phrase(t) for t in things)


def prompt_words(text: str) -> list[str]:
    """The words of a prompt, lowercased and without punctuation: "A Red Circle." -> ["a", "red", "circle"]."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


class _Tokens:
    """A cursor over the words of a prompt, for the recursive-descent parser."""

    def __init__(self, text: str):
        self.text = text
        self.words = prompt_words(text)
        self.pos = 0

    def error(self, expected: str) -> ValueError:
        found = repr(self.words[self.pos]) if self.pos < len(self.words) else "the end"
        return ValueError(f"prompt {self.text!r} is not in the shapes grammar: expected {expected} at "
                          f"word {self.pos + 1}, found {found}")

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, allowed: Sequence[str], expected: str) -> str:
        word = self.peek()
        if word not in allowed:
            raise self.error(expected)
        self.pos += 1
        return word


def _parse_phrase(tokens: _Tokens, counted: bool) -> tuple[Thing, int | None]:
    """Parses `a [colour] shape` (count None), or `number shape(s)` (count given) where `counted`."""
    first = tokens.take(("a", "an", *NUMBERS) if counted else ("a", "an"),
                        "'a', 'an' or a number" if counted else "'a' or 'an'")
    if first in NUMBERS:
        count = NUMBERS.index(first) + 1
        nouns = SHAPES if count == 1 else tuple(s + "s" for s in SHAPES)
        noun = tokens.take(nouns, f"one of {nouns}")
        return Thing(noun[:-1] if count > 1 else noun), count
    color = tokens.take(COLORS, "a colour") if tokens.peek() in COLORS else None
    shape = tokens.take(SHAPES, f"a shape {SHAPES}")
    if _noun_phrase(Thing(shape, color)) != f"{first} {_noun(Thing(shape, color))}":
        raise ValueError(f"prompt {tokens.text!r} is not in the shapes grammar: "
                         f"article {first!r} does not fit {_noun(Thing(shape, color))!r}")
    return Thing(shape, color), None


def parse_prompt(text: str) -> PromptSpec:
    """Parses a prompt of the shapes grammar back into its `PromptSpec`.

    Raises:
      ValueError: naming the prompt and the offending word if `text` is not in the grammar.
    """
    tokens = _Tokens(text)
    first, count = _parse_phrase(tokens, counted=True)
    if count is not None:
        if tokens.peek() is not None:
            raise tokens.error("the end of a counting prompt")
        return PromptSpec("counting", (first,), count=count)
    if tokens.peek() is None:
        return PromptSpec("colors" if first.color else "single_object", (first,))
    if tokens.peek() == "and":
        tokens.pos += 1
        second, _ = _parse_phrase(tokens, counted=False)
        task = "color_attr" if first.color and second.color else "two_objects"
        relation = None
    else:
        word = tokens.take(("left", "right", "above", "below"), "'and' or a relation")
        relation = f"{word} {tokens.take(('of',), 'of')}" if word in ("left", "right") else word
        second, _ = _parse_phrase(tokens, counted=False)
        task = "position"
    if tokens.peek() is not None:
        raise tokens.error("the end of the prompt")
    spec = PromptSpec(task, (first, second), relation=relation)
    if (bool(first.color) != bool(second.color) or (task == "position" and first.color)
            or first.shape == second.shape):
        raise ValueError(f"prompt {text!r} is not in the shapes grammar: two-object prompts name two "
                         "different shapes, colour both or neither, and position prompts name no colours")
    return spec


def sample_spec(rng: np.random.Generator, task: str) -> PromptSpec:
    """Draws a random prompt of `task` (one of `TASKS`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    s1, s2 = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    c1, c2 = (list(COLORS)[i] for i in rng.permutation(len(COLORS))[:2])
    if task == "single_object":
        return PromptSpec(task, (Thing(s1),))
    if task == "colors":
        return PromptSpec(task, (Thing(s1, c1),))
    if task == "counting":
        return PromptSpec(task, (Thing(s1),), count=int(rng.integers(1, 5)))
    if task == "two_objects":
        return PromptSpec(task, (Thing(s1), Thing(s2)))
    if task == "position":
        return PromptSpec(task, (Thing(s1), Thing(s2)), relation=RELATIONS[rng.integers(len(RELATIONS))])
    return PromptSpec(task, (Thing(s1, c1), Thing(s2, c2)))


# ---------------------------------------------------------------------------------------------
# Geometry shared with the checker.


# Unit direction of each relation in image coordinates (y down).
_RELATION_AXES = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def _direction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """GenEval's direction from box `b` to box `a`: boxes (..., 4) -> (..., 2).

    The centre offset is shrunk towards zero by 0.1 of the two boxes' summed sizes on each axis,
    then divided by the length of the full offset, so each component is in [-1, 1].
    """
    offset = (a[..., :2] + a[..., 2:] - b[..., :2] - b[..., 2:]) / 2
    slack = 0.1 * (a[..., 2:] - a[..., :2] + b[..., 2:] - b[..., :2])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - slack, 0.0)
    return shrunk / np.maximum(np.linalg.norm(offset, axis=-1, keepdims=True), 1e-9)


def relations(a: SceneObject, b: SceneObject) -> set[str]:
    """The relations that hold for `a` relative to `b`: those whose direction component exceeds 0.5."""
    direction = _direction(np.asarray(a.box), np.asarray(b.box))
    return {name for name, axis in _RELATION_AXES.items() if direction @ np.array(axis) > 0.5}


def _matching(objects: Sequence[SceneObject], thing: Thing) -> list[SceneObject]:
    return [o for o in objects if o.shape == thing.shape and thing.color in (None, o.color)]


def satisfies(spec: PromptSpec, objects: Sequence[SceneObject]) -> tuple[bool, str]:
    """Whether a scene with `objects` makes `spec` true, with the reason (GenEval's per-task rules).

    Counting needs the exact number of the shape; the other tasks need at least one matching object
    per noun phrase (with the colour when the phrase names one); position needs a pair of matching
    objects in the stated relation.
    """
    if spec.task == "counting":
        found = len(_matching(objects, spec.things[0]))
        ok = found == spec.count
        return ok, f"found {found} {spec.things[0].shape}(s), need exactly {spec.count}"
    groups = [_matching(objects, t) for t in spec.things]
    for thing, group in zip(spec.things, groups, strict=True):
        if not group:
            return False, f"no {_noun(thing)} found"
    if spec.task == "position":
        for a in groups[0]:
            for b in groups[1]:
                if spec.relation in relations(a, b):
                    return True, f"a {spec.things[0].shape} is {spec.relation} a {spec.things[1].shape}"
        return False, f"no {spec.things[0].shape} is {spec.relation} a {spec.things[1].shape}"
    return True, "every object found"


def unmet_part(spec: PromptSpec, objects: Sequence[SceneObject]) -> str:
    """What of `spec` a scene with `objects` gets wrong: "" when it `satisfies` it, else "count" (counting),
    "missing" (a noun phrase with no matching object) or "relation" (both found, not in the relation)."""
    if satisfies(spec, objects)[0]:
        return ""
    if spec.task == "counting":
        return "count"
    return "missing" if any(not _matching(objects, t) for t in spec.things) else "relation"


# ---------------------------------------------------------------------------------------------
# Renderer.


def _inside(shape: str, boxes: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points lie inside `shape` drawn in each box: boxes (m, 4), x (m, 1, w), y (m, h, 1) -> (m, h, w) bool.

    The box's centre and half sides are rounded to float32, the points' precision.
    """
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    cx, cy = ((x0 + x1) / 2).astype(np.float32), ((y0 + y1) / 2).astype(np.float32)
    hw, hh = ((x1 - x0) / 2).astype(np.float32), ((y1 - y0) / 2).astype(np.float32)
    u, v = (x - cx) / hw, (y - cy) / hh  # in [-1, 1] over the box
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage_windows(objects: Sequence[SceneObject], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage of each object's pixels, in equal windows that lie inside the image.

    Returns the windows' top rows and left columns, (m,) int, and their coverage, (m, h, w) float32 in [0, 1]:
    h x w is the largest object's, and each window is zero outside the pixels under its object's box.
    """
    boxes = np.array([o.box for o in objects], np.float64).reshape(-1, 4)
    top, left = np.maximum(boxes[:, 1].astype(int), 0), np.maximum(boxes[:, 0].astype(int), 0)
    bottom = np.minimum(np.ceil(boxes[:, 3]).astype(int), size)
    right = np.minimum(np.ceil(boxes[:, 2]).astype(int), size)
    h, w = int((bottom - top).max(initial=1)), int((right - left).max(initial=1))
    row0, col0 = np.minimum(top, size - h), np.minimum(left, size - w)
    s = _SUPERSAMPLE
    xs = col0[:, None, None].astype(np.float32) + (np.arange(w * s, dtype=np.float32) + 0.5) / s
    ys = row0[:, None, None].astype(np.float32) + (np.arange(h * s, dtype=np.float32)[:, None] + 0.5) / s
    windows = np.zeros((len(objects), h, w), np.float32)
    names = np.array([o.shape for o in objects])
    for shape in set(names):
        chosen = np.flatnonzero(names == shape)
        mask = _inside(shape, boxes[chosen], xs[chosen], ys[chosen])
        windows[chosen] = mask.reshape(-1, h, s, w, s).mean(axis=(2, 4), dtype=np.float32)
    rows, cols = row0[:, None] + np.arange(h), col0[:, None] + np.arange(w)
    under_box = (((rows >= top[:, None]) & (rows < bottom[:, None]))[:, :, None]
                 & ((cols >= left[:, None]) & (cols < right[:, None]))[:, None, :])
    return row0, col0, windows * under_box


def coverage(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Fraction of each pixel covered by `shape` in `box`: (size, size) float32 in [0, 1]."""
    (row0,), (col0,), (window,) = _coverage_windows([SceneObject(shape, None, box)], size)
    alpha = np.zeros((size, size), np.float32)
    alpha[row0:row0 + window.shape[0], col0:col0 + window.shape[1]] = window
    return alpha


def layouts(specs: Sequence[PromptSpec], streams: Sequence[np.random.Generator],
            size: int) -> list[tuple[SceneObject, ...]]:
    """Random objects (shapes, colours, boxes) that make each spec true in a size x size image, each drawn
    from its own stream.

    Boxes are square, inside a margin and a gap apart; for the position task the stated relation
    holds clearly (direction component beyond 0.75, the other one below 0.35). Each spec draws the colours
    its prompt leaves open, then batches of candidate layouts until one fits.
    """
    things = [list(spec.things) * spec.count if spec.task == "counting" else list(spec.things) for spec in specs]
    colors = [[t.color or list(COLORS)[rng.integers(len(COLORS))] for t in ts]
              for ts, rng in zip(things, streams, strict=True)]
    margin, gap = _MARGIN * size, _GAP * size
    chosen: list[np.ndarray | None] = [None] * len(specs)
    while pending := [i for i, box in enumerate(chosen) if box is None]:
        candidates = {}
        for i in pending:  # one batch of candidates per spec, from its stream
            low, high = _SIDE_FEW if len(things[i]) <= 2 else _SIDE_MANY
            sides = streams[i].uniform(low * size, high * size, size=(_CANDIDATES, len(things[i]), 1))
            corners = margin + streams[i].random((_CANDIDATES, len(things[i]), 2)) * (size - 2 * margin - sides)
            candidates[i] = np.concatenate([corners, corners + sides], axis=-1)
        for n in {len(things[i]) for i in pending}:  # the specs with n objects at once
            group = [i for i in pending if len(things[i]) == n]
            boxes = np.stack([candidates[i] for i in group])  # (g, candidates, n, 4)
            a, b = boxes[:, :, :, None, :], boxes[:, :, None, :, :]
            apart = ((a[..., 0] >= b[..., 2] + gap) | (b[..., 0] >= a[..., 2] + gap)
                     | (a[..., 1] >= b[..., 3] + gap) | (b[..., 1] >= a[..., 3] + gap))
            fits = (apart | np.eye(n, dtype=bool)).all(axis=(2, 3))
            position = np.array([specs[i].task == "position" for i in group])
            if position.any():
                axis = np.array([_RELATION_AXES[specs[i].relation] if p else (1.0, 0.0)
                                 for i, p in zip(group, position, strict=True)])[:, None, :]
                direction = _direction(boxes[:, :, 0], boxes[:, :, 1])
                along, across = (direction * axis).sum(-1), (direction * axis[..., ::-1]).sum(-1)
                fits &= ~position[:, None] | ((along > _POSITION_ALONG) & (np.abs(across) < _POSITION_ACROSS))
            for k, i in enumerate(group):
                if fits[k].any():
                    chosen[i] = boxes[k, fits[k].argmax()]
    return [tuple(SceneObject(t.shape, c, tuple(box)) for t, c, box in zip(ts, cs, boxes.tolist(), strict=True))
            for ts, cs, boxes in zip(things, colors, chosen, strict=True)]


@functools.cache
def _ramp(size: int) -> np.ndarray:
    """The background gradient's profile across the image: (size,) float64 from -0.5 to 0.5."""
    ramp = np.linspace(-0.5, 0.5, size)
    ramp.flags.writeable = False
    return ramp


def render(scenes: Sequence[Sequence[SceneObject]], streams: Sequence[np.random.Generator],
           size: int) -> np.ndarray:
    """Draws each scene on its own random background: (len(scenes), size, size, 3) uint8.

    Image i takes from `streams[i]` its background (a light tint, a gentle gradient and noise), then a colour
    jitter per object, and draws the objects of `scenes[i]` over it in order, anti-aliased.
    """
    n = len(scenes)
    base, angle, strength = np.empty((n, 3)), np.empty(n), np.empty(n)
    images = np.empty((n, size, size, 3))
    colors = []
    for i, (objects, rng) in enumerate(zip(scenes, streams, strict=True)):
        base[i] = rng.uniform(215.0, 245.0) + rng.uniform(-6.0, 6.0, size=3)
        angle[i], strength[i] = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 16.0)
        images[i] = rng.normal(0.0, 2.0, size=(size, size, 3))
        colors += [np.array(COLORS[o.color]) + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=3) for o in objects]
    ramp = _ramp(size)
    gradient = strength[:, None, None] * (np.cos(angle)[:, None, None] * ramp[None, None, :]
                                          + np.sin(angle)[:, None, None] * ramp[None, :, None])
    images += base[:, None, None, :] + gradient[..., None]
    owner = np.repeat(np.arange(n), [len(objects) for objects in scenes])
    order = np.concatenate([np.arange(len(objects)) for objects in scenes] + [np.zeros(0, int)])
    rows, cols, windows = _coverage_windows([o for objects in scenes for o in objects], size)
    h, w = windows.shape[1:]
    for slot in range(order.max(initial=-1) + 1):  # each image's objects in order, all images at once
        chosen = np.flatnonzero(order == slot)
        where = (owner[chosen, None, None], rows[chosen, None, None] + np.arange(h)[:, None],
                 cols[chosen, None, None] + np.arange(w))
        alpha = windows[chosen, ..., None]  # 0 away from the object: the blend leaves those pixels as they are
        color = np.stack([colors[k] for k in chosen])[:, None, None, :]
        images[where] = images[where] * (1.0 - alpha) + color * alpha
    return np.clip(np.rint(images, out=images), 0, 255, out=images).astype(np.uint8)


def _draw_spec(seed: int, index: int, tasks: Sequence[str]) -> tuple[np.random.Generator, PromptSpec]:
    """The random stream of sample `index` of the domain `seed` and its prompt, drawn first from it."""
    if index < 0:
        raise ValueError(f"sample index must be non-negative, got {index}")
    rng = np.random.default_rng((seed, index))
    return rng, sample_spec(rng, tasks[index % len(tasks)])


def make_samples(seed: int, indices: Sequence[int], *, size: int = 32, tasks: Sequence[str] = TASKS) -> list[Sample]:
    """Samples `indices` of the domain `seed`, drawn together: each as `make_sample` draws it alone."""
    if size < MIN_SIZE:
        raise ValueError(f"image size {size} is too small; expected at least {MIN_SIZE}")
    drawn = [_draw_spec(seed, int(index), tasks) for index in indices]
    streams, specs = [rng for rng, _ in drawn], [spec for _, spec in drawn]
    scenes = layouts(specs, streams, size)
    images = render(scenes, streams, size)
    return [Sample(format_prompt(spec), spec, image, objects)
            for spec, image, objects in zip(specs, images, scenes, strict=True)]


def make_sample(seed: int, index: int, *, size: int = 32, tasks: Sequence[str] = TASKS) -> Sample:
    """Sample `index` of the domain `seed`: task `tasks[index % len(tasks)]`, image size x size."""
    return make_samples(seed, [index], size=size, tasks=tasks)[0]


def prompts(seed: int, count: int, *, tasks: Sequence[str] = TASKS) -> list[str]:
    """The prompts of samples 0 to `count` - 1 of the domain `seed` (the tasks in turn), not rendered.

    GenEval-lite evaluates on these, drawn with a seed that training does not read.
    """
    return [format_prompt(_draw_spec(seed, index, tasks)[1]) for index in range(count)]

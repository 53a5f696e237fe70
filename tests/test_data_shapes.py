"""The shapes domain: grammar, renderer geometry, and the checker against the renderer's ground truth."""

import collections
import copy

import numpy as np
import pytest
from scipy import ndimage

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.data import checker, shapes
from sana_jax.data.shapes import PromptSpec, SceneObject, Thing

PER_TASK = 40  # samples per task at 32 px (tools/bench/bench_data.py runs 2,000)


@pytest.fixture(scope="module")
def samples32():
    return [shapes.make_sample(11, i, size=32) for i in range(PER_TASK * len(shapes.TASKS))]


@pytest.fixture(scope="module")
def samples64():
    return [shapes.make_sample(12, i, size=64) for i in range(10 * len(shapes.TASKS))]


@pytest.mark.parametrize("text, spec", [
    ("a circle", PromptSpec("single_object", (Thing("circle"),))),
    ("a diamond and a square", PromptSpec("two_objects", (Thing("diamond"), Thing("square")))),
    ("one triangle", PromptSpec("counting", (Thing("triangle"),), count=1)),
    ("four circles", PromptSpec("counting", (Thing("circle"),), count=4)),
    ("an orange square", PromptSpec("colors", (Thing("square", "orange"),))),
    ("a triangle left of a circle",
     PromptSpec("position", (Thing("triangle"), Thing("circle")), relation="left of")),
    ("a square below a diamond",
     PromptSpec("position", (Thing("square"), Thing("diamond")), relation="below")),
    ("a red circle and a blue square",
     PromptSpec("color_attr", (Thing("circle", "red"), Thing("square", "blue")))),
])
def test_parse_and_format_known_prompts(text, spec):
    assert shapes.parse_prompt(text) == spec
    assert shapes.format_prompt(spec) == text
    assert shapes.parse_prompt(text.upper() + "  ") == spec


@pytest.mark.parametrize("text, message", [
    ("a pink circle", "'pink'"),
    ("two circle", "'circle'"),
    ("an circle", "article 'an'"),
    ("a circle and a circle", "different shapes"),
    ("a red circle left of a square", "colour both or neither"),
    ("a circle beside a square", "'beside'"),
    ("three squares and a circle", "'and'"),
    ("a circle and two squares", "expected 'a' or 'an' at word 4, found 'two'"),
    ("", "found the end"),
])
def test_parse_rejects_prompts_outside_the_grammar(text, message):
    with pytest.raises(ValueError, match=message):
        shapes.parse_prompt(text)


def test_samples_round_trip_through_the_grammar_and_cover_every_task(samples32):
    tasks = collections.Counter(s.spec.task for s in samples32)
    assert tasks == {t: PER_TASK for t in shapes.TASKS}
    counts = collections.Counter(s.spec.count for s in samples32 if s.spec.task == "counting")
    assert set(counts) == {1, 2, 3, 4}
    for s in samples32:
        assert shapes.parse_prompt(s.prompt) == s.spec
        assert shapes.format_prompt(s.spec) == s.prompt
        assert set(s.prompt.split()) <= set(shapes.VOCABULARY)


def test_samples_are_determined_by_seed_and_index():
    a, b = shapes.make_sample(3, 17), shapes.make_sample(3, 17)
    assert a.prompt == b.prompt and a.objects == b.objects
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, shapes.make_sample(4, 17).image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_the_whole_frame_alpha_blend(size):
    """Each image: its stream's background, then each object over the whole frame, image (1 - coverage) +
    jittered colour x coverage, to the bit; the images of a batch are drawn together."""
    drawn = [shapes._draw_spec(5, index, shapes.TASKS) for index in range(3 * len(shapes.TASKS))]
    streams = [rng for rng, _ in drawn]
    scenes = shapes.layouts([spec for _, spec in drawn], streams, size)
    references = [copy.deepcopy(rng) for rng in streams]
    images = shapes.render(scenes, streams, size)
    ramp = np.linspace(-0.5, 0.5, size)
    for image, objects, stream in zip(images, scenes, references, strict=True):
        base = stream.uniform(215.0, 245.0) + stream.uniform(-6.0, 6.0, size=3)
        angle, strength = stream.uniform(0, 2 * np.pi), stream.uniform(0.0, 16.0)
        gradient = strength * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
        expected = stream.normal(0.0, 2.0, size=(size, size, 3)) + (base + gradient[..., None])
        for obj in objects:
            alpha = shapes.coverage(obj.shape, obj.box, size)[..., None]
            color = np.array(shapes.COLORS[obj.color]) + stream.uniform(-10, 10, size=3)
            expected = expected * (1.0 - alpha) + color * alpha
        np.testing.assert_array_equal(image, np.clip(np.rint(expected), 0, 255).astype(np.uint8))


def test_a_sample_drawn_in_a_batch_is_the_sample_drawn_alone():
    """Batch-mates do not change a sample: four-object counts (several rounds of candidate layouts), position
    prompts and every other task, in one batch against one at a time."""
    indices = [i for i in range(400) if i % 6 == 2 and shapes.make_sample(7, i).spec.count == 4][:4] + list(range(12))
    together = shapes.make_samples(7, indices)
    for index, sample in zip(indices, together, strict=True):
        alone = shapes.make_sample(7, index)
        assert (sample.prompt, sample.objects) == (alone.prompt, alone.objects)
        np.testing.assert_array_equal(sample.image, alone.image)


@pytest.mark.parametrize("shape, fill", [
    ("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5), ("diamond", 0.5)])
def test_coverage_integrates_to_the_shape_area(shape, fill):
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(50):
        side, (x0, y0) = rng.uniform(7, 12), rng.uniform(2, 18, size=2)
        alpha = shapes.coverage(shape, (x0, y0, x0 + side, y0 + side), 32)
        assert alpha.min() >= 0 and alpha.max() <= 1
        assert alpha[:, :int(x0)].sum() == 0 and alpha[:int(y0)].sum() == 0  # nothing outside the box
        errors.append(alpha.sum() / (fill * side * side) - 1)
    # 4x4 supersampling: unbiased, within a few percent on objects of 7-12 px.
    assert abs(np.mean(errors)) < 0.01 and np.max(np.abs(errors)) < 0.06


def test_layouts_make_their_prompts_true_and_keep_objects_apart(samples32):
    for s in samples32:
        ok, reason = shapes.satisfies(s.spec, s.objects)
        assert ok, (s.prompt, reason)
        boxes = np.array([o.box for o in s.objects])
        assert boxes.min() >= 0 and boxes.max() <= 32
        for i in range(len(boxes)):
            for j in range(i):
                apart = max(boxes[i, 0] - boxes[j, 2], boxes[j, 0] - boxes[i, 2],
                            boxes[i, 1] - boxes[j, 3], boxes[j, 1] - boxes[i, 3])
                assert apart >= 0.08 * 32 - 1e-9


def test_images_show_each_object_in_its_colour(samples32):
    for s in samples32:
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            # The point 2/3 down the box's middle column is inside every shape.
            pixel = s.image[int(y0 + 2 * (y1 - y0) / 3), int((x0 + x1) / 2)].astype(float)
            assert np.abs(pixel - shapes.COLORS[o.color]).max() <= 10.5, (s.prompt, o)


def _box_at(cx, cy, side=4.0, shape="square", color="red"):
    return SceneObject(shape, color, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


def _at(shape, color, cx):
    return _box_at(cx, 16.0, 6.0, shape, color)


@pytest.mark.parametrize("prompt, objects, expected", [
    ("two circles", [_at("circle", "red", 8), _at("circle", "blue", 24)], ""),
    ("two circles", [_at("circle", "red", 8), _at("square", "blue", 24)], "count"),
    ("a red square and a blue circle", [_at("square", "red", 8), _at("circle", "blue", 24)], ""),
    ("a red square and a blue circle", [_at("square", "blue", 8), _at("circle", "blue", 24)], "missing"),
    ("a square left of a circle", [_at("square", "red", 8), _at("circle", "red", 24)], ""),
    ("a square left of a circle", [_at("square", "red", 24), _at("circle", "red", 8)], "relation"),
    ("a square left of a circle", [_at("circle", "red", 8), _at("circle", "red", 24)], "missing"),
])
def test_unmet_part_names_what_a_scene_gets_wrong(prompt, objects, expected):
    spec = shapes.parse_prompt(prompt)
    assert shapes.unmet_part(spec, objects) == expected
    assert shapes.satisfies(spec, objects)[0] == (expected == "")


@pytest.mark.parametrize("dx, dy, expected", [
    (-10, 0, {"left of"}), (10, 1, {"right of"}), (0, -10, {"above"}), (1, 10, {"below"}),
    (-10, -10, {"left of", "above"}),  # 45 degrees: both components are 0.71 before shrinking
    (-10, -4, {"left of"}),
    (0.5, 0.5, set()),  # within 0.1 of the summed sizes: no relation
])
def test_relations_follow_genevals_rule(dx, dy, expected):
    # Summed sizes 8, so the offset shrinks by 0.8 on each axis before normalising.
    assert shapes.relations(_box_at(16 + dx, 16 + dy), _box_at(16, 16)) == expected


def _agreement(samples, image_of=lambda s: s.image):
    for s in samples:
        verdict = checker.check_detail(s.prompt, image_of(s))
        assert verdict.ok and verdict.failure == "", (s.prompt, verdict.reason)
        assert verdict.task == s.spec.task
        truth = sorted((o.shape, o.color) for o in s.objects)
        assert sorted((o.shape, o.color) for o in verdict.objects) == truth, s.prompt
        found = np.array([o.box for o in verdict.objects])
        for o in s.objects:  # every true box has a fitted one within a quarter pixel on every side
            assert np.abs(found - o.box).max(axis=1).min() < 0.25, (s.prompt, o)


def test_checker_accepts_rendered_samples_and_finds_their_objects_32px(samples32):
    _agreement(samples32)
    assert all(checker.check_detail(s.prompt, s.image).clutter == 0 for s in samples32[:30])


def test_checker_accepts_rendered_samples_and_finds_their_objects_64px(samples64):
    _agreement(samples64)


def _degrade(image, noise, blur, rng):
    image = ndimage.gaussian_filter(image.astype(np.float64), (blur, blur, 0))
    return np.clip(np.rint(image + rng.normal(0.0, noise, image.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("noise, blur", [(8.0, 0.0), (0.0, 0.7), (5.0, 0.5)])
def test_checker_accepts_blurred_and_noisy_renders(samples32, noise, blur):
    # Blur keeps each object's coverage sum and adds to its variance: the fit recovers the true box.
    rng = np.random.default_rng(1)
    _agreement(samples32[:60], lambda s: _degrade(s.image, noise, blur, rng))


def test_checker_judges_mismatched_pairs_like_the_ground_truth(samples32):
    rejected = 0
    partner = np.random.default_rng(0).permutation(len(samples32))
    for i, s in enumerate(samples32):
        other = samples32[partner[i]]
        truth, _ = shapes.satisfies(s.spec, other.objects)
        assert checker.check(s.prompt, other.image) == truth, (s.prompt, other.prompt)
        rejected += not truth
    assert rejected > 0.6 * len(samples32)


def test_checker_accepts_float_images_and_sees_a_removed_object(samples32):
    s = next(s for s in samples32 if s.spec.task == "counting" and s.spec.count == 3)
    assert checker.check(s.prompt, s.image.astype(np.float32) / 255.0)
    x0, y0, x1, y1 = (int(v) for v in s.objects[0].box)
    erased = s.image.copy()
    erased[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = np.median(s.image.reshape(-1, 3), axis=0)
    verdict = checker.check_detail(s.prompt, erased)
    assert not verdict.ok and "found 2" in verdict.reason and verdict.failure == "count"


def _prompts_of_every_task(rng):
    return [shapes.format_prompt(shapes.sample_spec(rng, task)) for task in shapes.TASKS]


def _assert_junk(images, rng):
    """No prompt holds for any of `images`, which show no object of the domain."""
    for image in images:
        for prompt in _prompts_of_every_task(rng):
            verdict = checker.check_detail(prompt, image)
            assert not verdict.ok, (prompt, verdict)


def test_checker_rejects_uniform_noise():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    _assert_junk(images, rng)
    assert all(checker.detect(image) == () for image in images[:5])


def test_checker_rejects_smooth_colour_blobs():
    # Gaussian-filtered noise, each channel stretched to 0-255: saturated blobs with soft edges.
    rng = np.random.default_rng(1)
    images = []
    for sigma in np.linspace(1.0, 4.0, 30):
        blobs = ndimage.gaussian_filter(rng.random((32, 32, 3)), (sigma, sigma, 0))
        blobs -= blobs.min(axis=(0, 1))
        images.append(np.rint(255 * blobs / blobs.max(axis=(0, 1))).astype(np.uint8))
    _assert_junk(images, rng)


def test_checker_rejects_random_latents_like_an_untrained_model():
    # An untrained model's samples: pale, blocky colour mush around the latent space's mean.
    rng = np.random.default_rng(2)
    latents = ndimage.gaussian_filter(rng.standard_normal((20, 8, 8, 48)), (0, 0.7, 0.7, 0))
    images = np.rint(255 * SpaceToDepthAE().decode(latents)).astype(np.uint8)
    _assert_junk(images, rng)


@pytest.mark.parametrize("value", [0, 128, 230, 255])
def test_checker_finds_nothing_on_uniform_images(value):
    rng = np.random.default_rng(value)
    images = [np.full((32, 32, 3), value, np.uint8), np.full((32, 32, 3), shapes.COLORS["red"], np.uint8)]
    for image in images:
        assert checker.detect(image) == ()
    _assert_junk(images, rng)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        checker.detect(images[0][..., 0])


def test_checker_rejects_the_right_object_among_heavy_clutter(samples32):
    s = next(s for s in samples32 if s.spec.task == "colors")
    x0, y0, x1, y1 = s.objects[0].box
    rng = np.random.default_rng(3)
    cluttered = s.image.copy()
    blotches = 0
    while blotches < 12:  # 3x3 blotches of random colour, all clear of the object
        r, c = rng.integers(0, 30, size=2)
        if c + 3 < x0 - 2 or c > x1 + 2 or r + 3 < y0 - 2 or r > y1 + 2:
            cluttered[r:r + 3, c:c + 3] = rng.integers(0, 256, size=3)
            blotches += 1
    verdict = checker.check_detail(s.prompt, cluttered)
    assert not verdict.ok and verdict.clutter > 0.05 and "clutter" in verdict.reason and verdict.failure == "clutter"
    assert [(o.shape, o.color) for o in verdict.objects] == [(s.objects[0].shape, s.objects[0].color)]


def _draw(items, size=32):
    """Objects (shape, box, rgb) composited by exact coverage over a flat light grey: uint8 image."""
    image = np.full((size, size, 3), 230.0)
    for shape, box, rgb in items:
        alpha = shapes.coverage(shape, box, size)[..., None]
        image = image * (1 - alpha) + np.asarray(rgb, np.float64) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


_RED = np.array(shapes.COLORS["red"], np.float64)


@pytest.mark.parametrize("name, image", [
    ("a 2:1 rectangle", _draw([("square", (6, 11, 26, 21), _RED)])),
    ("too large", _draw([("square", (2, 2, 30, 30), _RED)])),
    ("too small", _draw([("square", (10, 10, 14, 14), _RED)])),
    ("grey", _draw([("square", (10, 10, 20, 20), (110, 110, 110))])),
    ("faint", _draw([("square", (10, 10, 20, 20), 0.4 * _RED + 0.6 * 230)])),
    ("textured", np.clip(_draw([("square", (10, 10, 20, 20), _RED)]) + np.pad(
        np.random.default_rng(0).normal(0, 45, (10, 10, 3)), ((10, 12), (10, 12), (0, 0))), 0, 255
    ).astype(np.uint8)),
    ("fuzzy", np.rint(ndimage.gaussian_filter(_draw([("square", (9, 9, 23, 23), _RED)]).astype(float),
                                              (3, 3, 0))).astype(np.uint8)),
])
def test_checker_takes_implausible_shapes_for_clutter(name, image):
    assert checker.detect(image) == (), name
    assert not checker.check("a square", image), name
    assert not checker.check("a red square", image), name


def test_checker_finds_a_clean_drawn_object():
    # The control for the implausible shapes: each shape, solid and in the palette, on a flat background.
    # 4x4 supersampled coverage places an edge to within 1/8 pixel; the fit adds a little more.
    box = (9.3, 10.6, 19.8, 21.1)
    for shape in shapes.SHAPES:
        image = _draw([(shape, box, _RED)])
        assert checker.detect(image) == (SceneObject(shape, "red", pytest.approx(box, abs=0.2)),)
        assert checker.check(f"a red {shape}", image)

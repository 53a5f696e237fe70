"""Measures the shapes checker against the renderer's ground truth, and the input pipelines' speed.

  python tools/bench/bench_data.py [--per_task 2000] [--size 32] [--skip_throughput]

Prints five tables:
  1. rendered samples: how often the checker accepts a sample's own prompt (ground truth: always)
     and finds exactly the rendered objects (shape and colour multiset);
  2. shuffled pairs (prompt of sample i, image of sample perm(i) for a fixed random permutation):
     agreement with the ground truth computed from the rendered objects, and how many truly false
     pairs are rejected;
  3. degraded renders (Gaussian pixel noise, Gaussian blur): how often own prompts are still accepted,
     a hint of how the checker treats imperfect generated images;
  4. junk images (uniform noise, smooth random colour blobs, random latents decoded by the
     space-to-depth autoencoder, which look like an untrained model's samples), each paired with a
     random prompt of every task: how often the checker wrongly accepts them (ground truth: never);
  5. throughput of the on-the-fly shapes pipeline and of the cached ArrayRecord pipeline.
"""

from __future__ import annotations

import collections
import tempfile
import time

import numpy as np
from absl import app, flags
from scipy import ndimage
from tqdm import tqdm

from sana_jax.autoencoder import SpaceToDepthAE
from sana_jax.benchmarking import median_ms
from sana_jax.data import checker, records, shapes
from sana_jax.data.pipeline import make_train_iterator
from sana_jax.text_encoder import WordTextEncoder


def checker_tables(per_task: int, size: int, seed: int) -> None:
    samples = [shapes.make_sample(seed, i, size=size)
               for i in tqdm(range(per_task * len(shapes.TASKS)), desc=f"render {size}px")]
    accepted, exact = collections.Counter(), collections.Counter()
    for s in tqdm(samples, desc="check own prompts"):
        verdict = checker.check_detail(s.prompt, s.image)
        accepted[s.spec.task] += verdict.ok
        exact[s.spec.task] += (sorted((o.shape, o.color) for o in verdict.objects)
                               == sorted((o.shape, o.color) for o in s.objects))
    print(f"\nChecker on rendered samples ({size} px, {per_task} per task, seed {seed})")
    print("| task | samples | accepted | objects found exactly |\n|---|---|---|---|")
    for task in shapes.TASKS:
        print(f"| {task} | {per_task} | {100 * accepted[task] / per_task:.2f}% | "
              f"{100 * exact[task] / per_task:.2f}% |")
    n = len(samples)
    print(f"| all | {n} | {100 * sum(accepted.values()) / n:.2f}% | {100 * sum(exact.values()) / n:.2f}% |")

    agree, false_pairs, rejected = collections.Counter(), collections.Counter(), collections.Counter()
    partner = np.random.default_rng(seed).permutation(n)
    for i, s in enumerate(tqdm(samples, desc="check shuffled pairs")):
        other = samples[partner[i]]
        truth, _ = shapes.satisfies(s.spec, other.objects)
        said = checker.check(s.prompt, other.image)
        agree[s.spec.task] += said == truth
        false_pairs[s.spec.task] += not truth
        rejected[s.spec.task] += not truth and not said
    print("\nChecker on shuffled pairs (prompt of sample i, image of sample perm(i))")
    print("| prompt task | pairs | truly false | rejected of those | agreement with truth |")
    print("|---|---|---|---|---|")
    for task in shapes.TASKS:
        print(f"| {task} | {per_task} | {false_pairs[task]} | "
              f"{100 * rejected[task] / max(false_pairs[task], 1):.2f}% | "
              f"{100 * agree[task] / per_task:.2f}% |")
    total_false = sum(false_pairs.values())
    print(f"| all | {n} | {total_false} | {100 * sum(rejected.values()) / max(total_false, 1):.2f}% | "
          f"{100 * sum(agree.values()) / n:.2f}% |")


# (noise std, blur sigma) pairs.
DEGRADATIONS = ((4.0, 0.0), (12.0, 0.0), (20.0, 0.0), (0.0, 0.5), (0.0, 0.8), (0.0, 1.2), (6.0, 0.6))


def degraded_table(per_task: int, size: int, seed: int) -> None:
    samples = [shapes.make_sample(seed, i, size=size) for i in range(per_task * len(shapes.TASKS))]
    rng = np.random.default_rng(seed)
    print(f"\nChecker on degraded renders ({size} px, {per_task} per task): own prompts accepted")
    print("| noise std (of 255) | blur sigma (px) | " + " | ".join(shapes.TASKS) + " | all |")
    print("|---" * (len(shapes.TASKS) + 3) + "|")
    for noise, blur in tqdm(DEGRADATIONS, desc="degraded"):
        accepted = collections.Counter()
        for s in samples:
            image = ndimage.gaussian_filter(s.image.astype(np.float64), (blur, blur, 0))
            image = np.clip(np.rint(image + rng.normal(0.0, noise, image.shape)), 0, 255).astype(np.uint8)
            accepted[s.spec.task] += checker.check(s.prompt, image)
        cells = [f"{100 * accepted[t] / per_task:.1f}%" for t in shapes.TASKS]
        total = 100 * sum(accepted.values()) / len(samples)
        print(f"| {noise:g} | {blur:g} | " + " | ".join(cells) + f" | {total:.1f}% |")


def junk_images(kind: str, rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` images (count, size, size, 3) uint8 that show no object of the domain.

    kind: "noise" (uniform in 0-255 per channel), "blobs" (uniform noise smoothed by a Gaussian of
    sigma 1-4 px, each channel stretched to 0-255: saturated, soft-edged colour blobs) or "latents"
    (standard normal space-to-depth latents scaled by 0.6-1.2 and smoothed across blocks by sigma
    0.7, decoded: blocky, pale colour mush like an untrained model's samples).
    """
    if kind == "noise":
        return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    if kind == "blobs":
        sigmas = rng.uniform(1.0, 4.0, count)
        smooth = np.stack([ndimage.gaussian_filter(rng.random((size, size, 3)), (s, s, 0)) for s in sigmas])
        low, high = smooth.min(axis=(1, 2), keepdims=True), smooth.max(axis=(1, 2), keepdims=True)
        return np.rint(255 * (smooth - low) / (high - low)).astype(np.uint8)
    if kind == "latents":
        ae = SpaceToDepthAE()
        f = ae.downsample
        latents = rng.standard_normal((count, size // f, size // f, ae.latent_channels))
        latents *= rng.uniform(0.6, 1.2, (count, 1, 1, 1))
        latents = ndimage.gaussian_filter(latents, (0, 0.7, 0.7, 0))
        return np.rint(255 * np.asarray(ae.decode(latents))).astype(np.uint8)
    raise ValueError(f"unknown junk kind {kind!r}; expected 'noise', 'blobs' or 'latents'")


def junk_table(count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    print(f"\nChecker on junk images ({size} px, {count} per kind, each with a random prompt of every "
          "task): false accepts, and images where any confident object is found")
    print("| images | " + " | ".join(shapes.TASKS) + " | all | with an object |\n"
          + "|---" * (len(shapes.TASKS) + 3) + "|")
    for kind in ("noise", "blobs", "latents"):
        accepted, with_object = collections.Counter(), 0
        for image in tqdm(junk_images(kind, rng, count, size), desc=kind):
            with_object += bool(checker.detect(image))
            for task in shapes.TASKS:
                accepted[task] += checker.check(shapes.format_prompt(shapes.sample_spec(rng, task)), image)
        cells = [f"{accepted[t]}/{count}" for t in shapes.TASKS]
        total = sum(accepted.values())
        print(f"| {kind} | " + " | ".join(cells) + f" | {total}/{count * len(shapes.TASKS)} "
              f"({100 * total / (count * len(shapes.TASKS)):.2f}%) | {with_object}/{count} |")


def _samples_per_second(iterator, batch_size: int, batches: int) -> tuple[float, float]:
    """(samples/s of wall time, ms of this process's CPU time per sample) over `batches` back to back, after
    one warm-up batch (threads started, first batches read)."""
    next(iterator)
    start_cpu = time.process_time()
    ms = median_ms(lambda: next(iterator), lambda _: None, warmup=0, repeats=1, inner=batches)
    cpu_ms = (time.process_time() - start_cpu) * 1e3 / (batch_size * batches)
    return batch_size / ms * 1e3, cpu_ms


def throughput_table(batch_size: int, batches: int) -> None:
    print(f"\nPipeline throughput (batch {batch_size}, {batches} batches after one warm-up batch)")
    print("| source | latent | image | read threads | samples/s | CPU ms per sample |\n|---|---|---|---|---|---|")
    for latent, size in (("space_to_depth", 32), ("space_to_depth", 64), ("patch_pca", 32)):
        for threads in (1, 2):
            config = {"resolution": size, "latent": latent, "num_threads": threads}
            iterator = make_train_iterator(config, seed=0, batch_size=batch_size, process_index=0, process_count=1)
            rate, cpu_ms = _samples_per_second(iterator, batch_size, batches)
            print(f"| shapes, on the fly | {latent} | {size} px | {threads} | {rate:.0f} | {cpu_ms:.2f} |")
    with tempfile.TemporaryDirectory() as data_dir:
        ae, encoder = SpaceToDepthAE(), WordTextEncoder()
        count = batch_size * (batches + 2)
        samples = [shapes.make_sample(0, i) for i in tqdm(range(count), desc="cache records")]
        latents = ae.encode(np.stack([s.image for s in samples]))
        text, mask = encoder.encode_text([s.prompt for s in samples])
        records.write_shard(f"{data_dir}/{records.shard_name(0)}",
                            [records.encode_record(*row) for row in zip(latents, text, mask,
                                                                         [s.prompt for s in samples],
                                                                         strict=True)])
        records.write_null_caption(data_dir, *(a[0] for a in encoder.encode_text([""])))
        for threads in (1, 2):
            config = {"source": "array_record", "data_dir": data_dir, "num_threads": threads}
            iterator = make_train_iterator(config, seed=0, batch_size=batch_size, process_index=0,
                                           process_count=1)
            rate, cpu_ms = _samples_per_second(iterator, batch_size, batches)
            print(f"| array_record, cached | space_to_depth | 32 px | {threads} | {rate:.0f} | {cpu_ms:.2f} |")


_PER_TASK = flags.DEFINE_integer("per_task", 2000, "rendered samples per task")
_SIZE = flags.DEFINE_integer("size", 32, "image side of the checked samples")
_SEED = flags.DEFINE_integer("seed", 1, "shapes domain seed of the checked samples")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "batch size of the timed pipelines")
_BATCHES = flags.DEFINE_integer("batches", 20, "timed batches per pipeline")
_DEGRADED_PER_TASK = flags.DEFINE_integer("degraded_per_task", 300, "samples per task, degraded")
_JUNK = flags.DEFINE_integer("junk", 500, "junk images of each kind")
_SKIP_CHECKER = flags.DEFINE_bool("skip_checker", False, "skip the checker tables")
_SKIP_THROUGHPUT = flags.DEFINE_bool("skip_throughput", False, "skip the throughput table")


def main(argv: list[str]) -> None:
    del argv
    if not _SKIP_CHECKER.value:
        checker_tables(_PER_TASK.value, _SIZE.value, _SEED.value)
        degraded_table(_DEGRADED_PER_TASK.value, _SIZE.value, _SEED.value)
        junk_table(_JUNK.value, _SIZE.value, _SEED.value)
    if not _SKIP_THROUGHPUT.value:
        throughput_table(_BATCH_SIZE.value, _BATCHES.value)


if __name__ == "__main__":
    app.run(main)

"""Inference-time scaling from the command line: N candidates per prompt, judged, the best k kept.

  python -m sana_jax.sample --checkpoint=DIR --prompt="a red circle" --num_candidates=8 --keep=1 \
      --verifier=checker --out=DIR
  python -m sana_jax.sample --pretrained=Sana_1600M_1024px_diffusers --prompt="a cat" --verifier=clip \
      --verifier_path=CLIP --out=DIR

The model is a checkpoint of this library (--checkpoint, with the shapes or --text_encoder / --autoencoder
codecs) or a diffusers SANA pipeline folder (--pretrained: its transformer, Gemma-2 text encoder, DC-AE and
scheduler shift, loaded by `sana_jax.pipeline.SanaPipeline.from_pretrained`).

Writes to --out, per prompt p (numbered from 0 in the order given):
  p{p:03d}_keep{r}.png    the r-th kept candidate (best first for best_of_n, bracket order for knockout);
  p{p:03d}_sheet.png      the candidates (the first 64 and any kept one) with their scores, kept ones framed
                          green, the rest red;
and scores.json: the settings and, per prompt, its text, N scores and the kept candidate indices.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from sana_jax import checkpoint, cli, pipeline, sampling
from sana_jax.data import shapes
from sana_jax.data.pipeline import DataConfig, make_autoencoder, make_text_encoder
from sana_jax.grids import save_grid
from sana_jax.scaling import search
from sana_jax.scaling.candidates import generate_candidates

VERIFIERS = ("checker", "learned", "clip", "vlm")
# SANA's sampler; a checkpoint written by the trainer records its own (metadata "sampling").
SAMPLING_DEFAULTS = {"num_steps": 20, "guidance_scale": 4.5, "shift": 3.0, "solver": "flow_dpm_solver"}
TEXT_ENCODERS = ("shapes", "gemma")
AUTOENCODERS = ("shapes", "dcae")
SHEET_SIZE = 64  # candidates on a contact sheet, besides kept ones beyond them


def flag_values() -> flags.FlagValues:
    """The command line's flags, on their own `FlagValues`."""
    values = flags.FlagValues()
    define = {"flag_values": values}
    flags.DEFINE_string("checkpoint", None, "a checkpoint directory of sana_jax.checkpoint.save", **define)
    flags.DEFINE_string("pretrained", None, "instead of --checkpoint, a diffusers SANA pipeline folder", **define)
    flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for several)", **define)
    flags.DEFINE_string("prompts_file", None, "a text file of prompts, one per line", **define)
    flags.DEFINE_integer("num_candidates", 8, "N, candidates per prompt", **define)
    flags.DEFINE_integer("keep", 1, "k, candidates kept per prompt", **define)
    flags.DEFINE_enum("verifier", "checker", VERIFIERS, f"one of {VERIFIERS}", **define)
    flags.DEFINE_string("verifier_path", None, "weights of the learned, clip or vlm verifier", **define)
    flags.DEFINE_enum("method", "best_of_n", search.METHODS, f"one of {search.METHODS} (knockout needs vlm)",
                      **define)
    flags.DEFINE_string("out", None, "output directory", **define)
    flags.mark_flag_as_required("out", flag_values=values)
    flags.DEFINE_integer("seed", 0, "seed of the candidates' noise", **define)
    for name, define_flag in (("num_steps", flags.DEFINE_integer), ("guidance_scale", flags.DEFINE_float),
                              ("shift", flags.DEFINE_float), ("solver", flags.DEFINE_string)):
        define_flag(name, None, f"default: the checkpoint's metadata (shift and solver: --pretrained's scheduler), "
                    f"else {SAMPLING_DEFAULTS[name]}", **define)
    flags.DEFINE_integer("chunk_size", None, "candidates sampled at once (default: all N, or as many as fit in "
                         "a quarter of the free memory)", **define)
    flags.DEFINE_integer("resolution", None, "image side in pixels (default: the checkpoint's metadata, else "
                         f"{DataConfig.resolution}; for --pretrained the transformer's sample_size times the "
                         "autoencoder's downsampling)", **define)
    flags.DEFINE_enum("text_encoder", None, TEXT_ENCODERS, "with --checkpoint (default shapes)", **define)
    flags.DEFINE_string("text_encoder_path", None, "a Gemma-2 checkpoint for --text_encoder=gemma", **define)
    flags.DEFINE_enum("autoencoder", None, AUTOENCODERS, "with --checkpoint (default shapes)", **define)
    flags.DEFINE_string("autoencoder_path", None, "a diffusers AutoencoderDC folder for --autoencoder=dcae",
                        **define)
    return values


def parse_args(argv: Sequence[str] | None = None) -> SimpleNamespace:
    """The settings of a command line (`argv` without the program name; None: `sys.argv[1:]`), completed from
    the checkpoint's or pipeline's records; a mistake ends the command with one line on stderr (status 2)."""
    values = flag_values()
    cli.parse(values, argv, __doc__)
    args = SimpleNamespace(**values.flag_values_dict())

    if args.method == "knockout" and args.verifier != "vlm":
        cli.fail(f"--method=knockout compares yes/no logits: it needs --verifier=vlm, not {args.verifier!r}")
    if args.verifier != "checker" and not args.verifier_path:
        cli.fail(f"--verifier={args.verifier} needs --verifier_path")
    if not 1 <= args.keep <= args.num_candidates:
        cli.fail(f"--keep={args.keep} with --num_candidates={args.num_candidates}: expected "
                 "1 <= keep <= num_candidates")
    if (args.checkpoint is None) == (args.pretrained is None):
        cli.fail("expected exactly one of --checkpoint (a sana_jax checkpoint) and --pretrained (a diffusers "
                 "SANA pipeline folder)")
    if args.pretrained:
        given = [f"--{name}" for name in ("text_encoder", "text_encoder_path", "autoencoder", "autoencoder_path")
                 if getattr(args, name) is not None]
        if given:
            cli.fail(f"--pretrained brings its own text encoder and autoencoder: drop {', '.join(given)}")
    else:
        for name, path in (("text_encoder", args.text_encoder_path), ("autoencoder", args.autoencoder_path)):
            setattr(args, name, getattr(args, name) or "shapes")
            if getattr(args, name) != "shapes" and not path:
                cli.fail(f"--{name}={getattr(args, name)} needs --{name}_path")
        if not Path(args.checkpoint, checkpoint.CONFIG_FILE).is_file():
            cli.fail(f"--checkpoint={args.checkpoint}: no checkpoint there (expected a directory holding "
                     f"{checkpoint.CONFIG_FILE})")
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            cli.fail(f"--prompts_file={args.prompts_file}: no such file")
        args.prompt += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not args.prompt:
        cli.fail("no prompts: give --prompt and/or --prompts_file")
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS}
    if args.pretrained:
        try:
            args.data, sampler = None, pretrained_settings(args.pretrained, **given)
        except (OSError, ValueError) as error:
            cli.fail(f"--pretrained={args.pretrained}: {error}")
    else:
        args.data, sampler = recorded_settings(args.checkpoint, **given)
    for name, value in sampler.items():
        setattr(args, name, value)
    for name, ok, expected in (
            ("num_steps", args.num_steps >= 1, "an integer >= 1"),
            ("guidance_scale", math.isfinite(args.guidance_scale) and args.guidance_scale >= 0,
             "a non-negative number (1: no guidance)"),
            ("shift", math.isfinite(args.shift) and args.shift > 0, "a positive number"),
            ("solver", args.solver in sampling.SOLVERS, f"one of {sampling.SOLVERS}"),
            ("chunk_size", args.chunk_size is None or args.chunk_size >= 1, "an integer >= 1")):
        if not ok:
            cli.fail(f"--{name}={getattr(args, name)}: expected {expected}")
    if args.resolution is None and args.data is not None:  # --pretrained: set by `load_model`.
        args.resolution = args.data.resolution
    return args


def recorded_settings(checkpoint_dir: str, **given: Any) -> tuple[DataConfig, dict[str, Any]]:
    """The data settings and sampler a checkpoint records (its metadata), with `given` values that are not
    None taking precedence, and SANA's sampler (`SAMPLING_DEFAULTS`) where neither says."""
    metadata = checkpoint.load_metadata(checkpoint_dir)
    recorded = metadata.get("sampling", {})
    sampler = {name: given[name] if given.get(name) is not None else recorded.get(name, default)
               for name, default in SAMPLING_DEFAULTS.items()}
    return DataConfig.from_mapping(metadata.get("data", {})), sampler


def pretrained_settings(folder: str, **given: Any) -> dict[str, Any]:
    """The sampler for a diffusers pipeline folder: `given` values that are not None, else the scheduler's shift
    and solver (`pipeline.scheduler_settings`), else `SAMPLING_DEFAULTS` (diffusers' defaults too)."""
    scheduler_file = Path(folder, "scheduler", pipeline.SCHEDULER_CONFIG)
    if not Path(folder, "model_index.json").is_file() or not scheduler_file.is_file():
        raise FileNotFoundError(f"expected a diffusers pipeline folder holding model_index.json and {scheduler_file}")
    scheduler = pipeline.scheduler_settings(json.loads(scheduler_file.read_text()))
    return {name: given[name] if given.get(name) is not None else scheduler.get(name, default)
            for name, default in SAMPLING_DEFAULTS.items()}


def load_model(args: SimpleNamespace) -> tuple[Any, Any, Any, Any]:
    """(config, params, text encoder, autoencoder) of --checkpoint or --pretrained; for --pretrained, fills in
    the default --resolution (the transformer's sample_size times the autoencoder's downsampling)."""
    if args.pretrained:
        pipe = pipeline.SanaPipeline.from_pretrained(args.pretrained)
        if pipe.config.out_channels != pipe.config.in_channels:
            raise ValueError(f"--pretrained={args.pretrained}: transformer out_channels={pipe.config.out_channels}"
                             f" != in_channels={pipe.config.in_channels} (a learned-sigma head) is not supported")
        if args.resolution is None:
            args.resolution = pipe.config.sample_size * pipe.downsample
        return pipe.config, pipe.params, pipe.text_encoder, pipe.autoencoder
    config, params = checkpoint.load(args.checkpoint)
    return config, params, _text_encoder(args), _autoencoder(args)


def _text_encoder(args: SimpleNamespace) -> Any:
    if args.text_encoder == "gemma":
        from sana_jax.text_encoder import GemmaTextEncoder

        return GemmaTextEncoder(args.text_encoder_path)
    return make_text_encoder(args.data)


def _autoencoder(args: SimpleNamespace) -> Any:
    if args.autoencoder == "dcae":
        from sana_jax.autoencoder import DCAE

        return DCAE.from_pretrained(args.autoencoder_path)
    return make_autoencoder(args.data)


def _verifier(args: SimpleNamespace, text_encoder: Any) -> Any:
    from sana_jax.scaling import learned_verifier, verifiers

    if args.verifier == "checker":
        return verifiers.CheckerVerifier()
    if args.verifier == "learned":
        return learned_verifier.LearnedVerifier(*learned_verifier.load(args.verifier_path), text_encoder)
    if args.verifier == "clip":
        return verifiers.ClipScorer(args.verifier_path)
    return verifiers.VLMJudge(args.verifier_path)


def judge(verifier: Any, images: np.ndarray, prompt: str, keep: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) of one prompt's candidate images (N, H, W, 3) and the kept indices (keep,).

    For "knockout" the score is the judge's yes-minus-no logit and the kept ones win SANA's tournament.
    """
    tables = search.verifier_tables(verifier, images[None], [prompt], method)
    scores = tables["scores"] if method == "best_of_n" else tables["yes_logits"] - tables["no_logits"]
    return np.asarray(scores[0], np.float32), search.select_from_tables(tables, keep, method)[0]


def encode_prompts(text_encoder: Any, prompts: list[str], *, grammar: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each prompt's (text (1, L, C), mask (1, L)); exits naming the first prompt that does not encode (or,
    with `grammar`, is not in the shapes grammar the checker reads) before anything is sampled or written."""
    encoded = []
    for p, prompt in enumerate(prompts):
        try:
            encoded.append(text_encoder.encode_text([prompt]))
            if grammar:
                shapes.parse_prompt(prompt)
        except ValueError as error:
            cli.fail(f"prompt {p} ({prompt!r}): {error}")
    return encoded


def main(argv: Sequence[str] | None = None) -> None:
    """Samples, judges and writes the candidates of the command line `argv` (None: `sys.argv[1:]`)."""
    args = parse_args(argv)
    config, params, text_encoder, autoencoder = load_model(args)
    verifier = _verifier(args, text_encoder)
    if args.resolution % autoencoder.downsample:
        cli.fail(f"--resolution={args.resolution}: expected a multiple of the autoencoder's downsampling factor "
                 f"{autoencoder.downsample}")
    side = args.resolution // autoencoder.downsample
    encoded = encode_prompts(text_encoder, args.prompt, grammar=args.verifier == "checker")
    # The null caption; a pipeline's Gemma-2 encodes it without the instruction prefix, as diffusers does.
    null = text_encoder.encode_text([""], instruction=False) if args.pretrained else text_encoder.encode_text([""])
    null_text, null_mask = (x[0] for x in null)
    key = jax.random.key(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for p, (prompt, (text, mask)) in enumerate(zip(tqdm(args.prompt, desc="prompts"), encoded, strict=True)):
        latents = generate_candidates(
            params, config, text, mask, null_text, null_mask, key, num_candidates=args.num_candidates,
            height=side, width=side, chunk_size=args.chunk_size, num_steps=args.num_steps,
            guidance_scale=args.guidance_scale, shift=args.shift, solver=args.solver, prompt_ids=[p],
            progress=True)[0]
        images = np.clip(np.asarray(autoencoder.decode(latents), np.float32), 0.0, 1.0)
        scores, kept = judge(verifier, images, prompt, args.keep, args.method)
        files = []
        for rank, i in enumerate(kept):
            files.append(f"p{p:03d}_keep{rank}.png")
            Image.fromarray(np.round(images[i] * 255).astype(np.uint8)).save(out / files[-1])
        shown = sorted(set(range(min(len(images), SHEET_SIZE))) | set(kept.tolist()))
        labels = [f"#{i} score {scores[i]:.3f}" + (" kept" if i in kept else "") for i in shown]
        save_grid(out / f"p{p:03d}_sheet.png", images[shown], labels, verdicts=[i in kept for i in shown],
                  title=prompt)
        results.append({"prompt": prompt, "scores": scores.tolist(), "selected": kept.tolist(), "files": files})

    settings = {k: v for k, v in vars(args).items() if k not in ("prompt", "data")}
    (out / "scores.json").write_text(json.dumps({"settings": settings, "prompts": results}, indent=2) + "\n")
    print(f"wrote {len(results)} prompts' kept images, contact sheets and scores.json to {out}", file=sys.stderr)


if __name__ == "__main__":
    cli.restart_with_allocator_settings()
    cli.use_compilation_cache()
    main()

"""`sana_jax.pipeline.SanaPipeline` end to end against diffusers' `SanaPipeline` (CPU, float32).

A tiny random diffusers pipeline (SanaTransformer2DModel, AutoencoderDC, Gemma2Model with a byte-level BPE
tokenizer, Flow-DPM-Solver scheduler) is built offline and saved with `save_pretrained`; ours loads the
folder and must give the same images for the same prompts and initial latents.
"""

import inspect
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)
from PIL import Image
from test_text_encoder import build_tokenizer
from transformers import Gemma2Config, Gemma2Model

from sana_jax import pipeline, sample, sampling
from sana_jax.scaling import candidates
from sana_jax.surgery import pruning

INSTRUCTION = list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
PROMPTS = ["A Red circle ", "two green triangles left of a blue square, a cat sleeping"]
SHIFT = 3.0
GEMMA_HIDDEN = 32
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # diffusers' SanaPipeline requires multiples of 32; the tiny DC-AE downsamples by 2.
LATENT_SIZE = IMAGE_SIZE // 2
TRANSFORMER = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2,
                   attention_head_dim=8, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                   cross_attention_dim=16, caption_channels=GEMMA_HIDDEN, sample_size=LATENT_SIZE,
                   qk_norm="rms_norm_across_heads")
AUTOENCODER = dict(
    in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
    encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
TOLERANCE = 1e-3


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter random (diffusers and transformers start some at zero or one): matrices with std
    1/sqrt(fan-in), vectors with std 0.5, so activations keep a trained model's scale."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["\n".join(INSTRUCTION), *PROMPTS, "blurry, low quality"])
    gemma = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=GEMMA_HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        attn_logit_softcapping=1.0, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))
    _randomize(gemma)
    transformer = SanaTransformer2DModel(**TRANSFORMER)
    _randomize(transformer)
    vae = AutoencoderDC(**AUTOENCODER)
    with torch.no_grad():
        for name, value in vae.named_parameters():
            if value.ndim == 1:
                value.uniform_(-0.5, 0.5)
                if "norm" in name and name.endswith("weight"):
                    value.add_(1.0)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=SHIFT)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=gemma.eval(), vae=vae.eval(),
                        transformer=transformer.eval(), scheduler=scheduler)
    path = tmp_path_factory.mktemp("sana_pipeline")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def euler_folder(folder, tmp_path_factory):
    """The same pipeline with diffusers' FlowMatchEulerDiscreteScheduler (as in diffusers' own fast tests)."""
    path = tmp_path_factory.mktemp("sana_pipeline_euler") / "pipe"
    shutil.copytree(folder, path)
    shutil.rmtree(path / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def _diffusers_pipeline(path) -> SanaPipeline:
    pipe = SanaPipeline.from_pretrained(path)
    # Gemma-2's attention-logit soft-capping runs only in eager attention (as in sana_jax.text_encoder).
    pipe.text_encoder.set_attn_implementation("eager")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(folder):
    return _diffusers_pipeline(folder)


@pytest.fixture(scope="module")
def ours(folder):
    return pipeline.SanaPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(0).standard_normal(
        (len(PROMPTS), LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)).astype(np.float32)


def _diffusers_images(pipe, latents, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(PROMPTS, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
                    height=IMAGE_SIZE, width=IMAGE_SIZE, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(0), **kwargs).images


def test_loads_folder(ours):
    assert (ours.shift, ours.solver) == (SHIFT, "flow_dpm_solver")
    assert ours.config.caption_channels == GEMMA_HIDDEN and ours.config.qk_norm == "rms_norm_across_heads"
    assert ours.downsample == 2 and ours.autoencoder.scaling_factor == pytest.approx(0.41407)
    assert ours.text_encoder.max_length == 300


@pytest.mark.parametrize("num_steps", [3, 20])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_images_match_diffusers(ours, reference, latents, num_steps, guidance_scale):
    expected = _diffusers_images(reference, latents, num_inference_steps=num_steps, guidance_scale=guidance_scale)
    images = ours(PROMPTS, latents=latents, num_inference_steps=num_steps, guidance_scale=guidance_scale)
    assert images.shape == (len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert expected.std() > 0.05  # Not a saturated or constant image.
    np.testing.assert_allclose(images, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("num_steps", [4])
def test_flow_match_euler_matches_diffusers(euler_folder, latents, num_steps):
    reference = _diffusers_pipeline(euler_folder)
    assert isinstance(reference.scheduler, FlowMatchEulerDiscreteScheduler)
    ours = pipeline.SanaPipeline.from_pretrained(euler_folder)
    assert (ours.shift, ours.solver) == (7.0, "flow_match_euler")
    kwargs = dict(num_inference_steps=num_steps, guidance_scale=4.5)
    expected = _diffusers_images(reference, latents, **kwargs)
    np.testing.assert_allclose(ours(PROMPTS, latents=latents, **kwargs), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_flow_match_euler_schedule(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas, timesteps = sampling.flow_match_euler_schedule(num_steps, shift)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_negative_prompt_matches_diffusers(ours, reference, latents):
    kwargs = dict(num_inference_steps=3, guidance_scale=4.5)
    expected = _diffusers_images(reference, latents, negative_prompt="Blurry, low quality", **kwargs)
    images = ours(PROMPTS, latents=latents, negative_prompt="Blurry, low quality", **kwargs)
    np.testing.assert_allclose(images, expected, rtol=0, atol=TOLERANCE)
    assert np.abs(images - ours(PROMPTS, latents=latents, **kwargs)).max() > 1e-2


def test_noise_from_key(ours):
    key = jax.random.key(3)
    a = ours(PROMPTS, num_inference_steps=3, key=key)
    assert a.shape == (len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, 3)
    noise = jax.random.normal(key, (len(PROMPTS), LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS))
    np.testing.assert_array_equal(a, ours(PROMPTS, num_inference_steps=3, latents=noise))


def test_save_pretrained_pruned_transformer(ours, latents, tmp_path):
    """A pruned transformer exported with the other components loads in diffusers and samples alike."""
    pruned = ours.with_transformer(*pruning.prune(ours.params, ours.config, keep_blocks=[1]))
    pruned.save_pretrained(tmp_path / "pruned")
    reference = _diffusers_pipeline(tmp_path / "pruned")
    assert reference.transformer.config.num_layers == 1
    kwargs = dict(num_inference_steps=3, guidance_scale=4.5)
    expected = _diffusers_images(reference, latents, **kwargs)
    np.testing.assert_allclose(pruned(PROMPTS, latents=latents, **kwargs), expected, rtol=0, atol=TOLERANCE)
    reloaded = pipeline.SanaPipeline.from_pretrained(tmp_path / "pruned")
    assert reloaded.config == pruned.config
    with pytest.raises(ValueError, match="source folder"):
        ours.save_pretrained(ours.source)


def test_unsupported_scheduler_is_named(folder, tmp_path):
    values = json.loads((folder / "scheduler" / pipeline.SCHEDULER_CONFIG).read_text())
    assert pipeline.scheduler_settings(values) == {"shift": SHIFT, "solver": "flow_dpm_solver"}
    with pytest.raises(ValueError, match="use_flow_sigmas=False"):
        pipeline.scheduler_settings({**values, "use_flow_sigmas": False})
    with pytest.raises(ValueError, match="_class_name='EulerDiscreteScheduler'"):
        pipeline.scheduler_settings({**values, "_class_name": "EulerDiscreteScheduler"})
    euler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert pipeline.scheduler_settings(euler) == {"shift": 3.0, "solver": "flow_match_euler"}
    with pytest.raises(ValueError, match="use_dynamic_shifting=True"):
        pipeline.scheduler_settings({**euler, "use_dynamic_shifting": True})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.SanaPipeline.from_pretrained(tmp_path)


def test_bad_latents_are_named(ours):
    with pytest.raises(ValueError, match=r"latents \(1, 4, 16, 16\)"):
        ours(PROMPTS[:1], latents=np.zeros((1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), np.float32))


def test_sample_cli_pretrained(folder, euler_folder, tmp_path, capsys):
    """`python -m sana_jax.sample --pretrained=FOLDER`: the pipeline's transformer, Gemma-2, DC-AE and shift."""
    out = tmp_path / "out"
    sample.main([f"--pretrained={folder}", "--prompt=a red circle", "--prompt=Two Triangles",
                 "--num_candidates=3", "--keep=3", "--num_steps=2", "--verifier=checker", f"--out={out}"])
    report = json.loads((out / "scores.json").read_text())
    settings = report["settings"]
    assert (settings["shift"], settings["solver"], settings["resolution"]) == (SHIFT, "flow_dpm_solver", IMAGE_SIZE)
    assert settings["pretrained"] == str(folder) and settings["checkpoint"] is None
    assert [entry["prompt"] for entry in report["prompts"]] == ["a red circle", "Two Triangles"]
    for p, entry in enumerate(report["prompts"]):
        assert len(entry["scores"]) == 3 and set(entry["scores"]) <= {0.0, 1.0}  # The shapes checker's verdicts.
        assert sorted(entry["selected"]) == [0, 1, 2]
        assert entry["files"] == [f"p{p:03d}_keep{r}.png" for r in range(3)]
        for name in entry["files"]:
            image = np.asarray(Image.open(out / name))
            assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.std() > 5  # Not a constant image.
        assert (out / f"p{p:03d}_sheet.png").stat().st_size > 0

    # Candidate 0 of prompt 1 is the pipeline's image from the same starting noise (--seed=0).
    ours = pipeline.SanaPipeline.from_pretrained(folder)
    noise = candidates.candidate_noise(jax.random.key(0), 1, 0, (LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS))
    expected = ours(["Two Triangles"], latents=noise[None], num_inference_steps=2)[0]
    entry = report["prompts"][1]
    image = np.asarray(Image.open(out / entry["files"][entry["selected"].index(0)]), np.float32) / 255
    np.testing.assert_allclose(image, expected, atol=0.5 / 255 + 1e-4)

    for flags, words in [
        ([], ["exactly one of --checkpoint", "--pretrained"]),
        ([f"--pretrained={folder}", f"--checkpoint={folder}"], ["exactly one of --checkpoint"]),
        ([f"--pretrained={tmp_path}"], ["model_index.json"]),
        ([f"--pretrained={folder}", "--text_encoder=gemma"], ["--text_encoder"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sample.parse_args(["--prompt=a red circle", f"--out={tmp_path / 'bad'}", *flags])
        message = capsys.readouterr().err
        assert exit_info.value.code != 0 and all(word in message for word in words), message
        assert "Traceback" not in message
    assert not (tmp_path / "bad").exists()
    # A FlowMatchEuler pipeline samples on its own schedule, as the pipeline does; --solver overrides it.
    args = sample.parse_args([f"--pretrained={euler_folder}", "--solver=euler", "--prompt=a red circle",
                              f"--out={tmp_path}"])
    assert (args.shift, args.solver, args.resolution) == (7.0, "euler", None)
    euler_out = tmp_path / "euler"
    sample.main([f"--pretrained={euler_folder}", "--prompt=a red circle", "--num_candidates=1", "--keep=1",
                 "--num_steps=2", "--verifier=checker", f"--out={euler_out}"])
    report = json.loads((euler_out / "scores.json").read_text())
    assert (report["settings"]["shift"], report["settings"]["solver"]) == (7.0, "flow_match_euler")
    euler_pipe = pipeline.SanaPipeline.from_pretrained(euler_folder)
    noise = candidates.candidate_noise(jax.random.key(0), 0, 0, (LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS))
    expected = euler_pipe(["a red circle"], latents=noise[None], num_inference_steps=2)[0]
    image = np.asarray(Image.open(euler_out / report["prompts"][0]["files"][0]), np.float32) / 255
    np.testing.assert_allclose(image, expected, atol=0.5 / 255 + 1e-4)
